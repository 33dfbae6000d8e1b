"""The subject taxonomy: every NATS subject this system uses, defined once.

Each family is a template of fixed length whose `{param}` tokens are filled
from validated ids. Builders never accept a token that could escape its place
(no `.`, `*`, `>`, whitespace), parsers return the ids of a concrete subject,
and `filter()` gives the wildcard form used for stream subjects, consumer
filters and (in the security layer) per-principal permissions.

Layout: `cw.<tenant>.<noun>.<principal or object id>.<verb>`. The tenant is the
second token so that `cw.<tenant>.>` covers exactly one tenant; the principal
that owns a subject is a token of it so the server can confine each principal
to its own subjects. Pre-credential bootstrap requests (pairing redemption,
gateway registration) live under `cw.bootstrap`, which no tenant may be named.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

from ._tokens import RESERVED_TENANTS, InvalidTokenError, check_tenant, check_token

ROOT = "cw"
PARSED_KEPT = 8192  # parsed subjects kept per family (SubjectFamily.parse)


class Delivery(str, Enum):
    """How messages on a family travel."""

    JETSTREAM = "jetstream"  # stored in a stream; durable, acked, replayable
    CORE = "core"  # fire-and-forget core NATS (presence, live tails)
    REQUEST = "request"  # core NATS request/reply; the reply goes to the caller's inbox


class SubjectError(ValueError):
    """A subject does not belong to a family, or a parameter is missing or invalid."""


@dataclass(frozen=True)
class SubjectFamily:
    """One kind of subject: its template, who publishes it and how it travels."""

    name: str
    template: str
    message: str
    publisher: str
    consumer: str
    delivery: Delivery
    summary: str
    stream: str | None = None
    reply: str | None = None
    # The parameters its stream partitions on: the stream stores each message under
    # the published subject plus one trailing token, the partition number, so that
    # a consumer per partition sees all of one key's messages, in order.
    partition_by: tuple[str, ...] = ()
    tokens: tuple[str, ...] = field(init=False)
    params: tuple[str, ...] = field(init=False)
    # Subjects parsed before (a consumer or responder sees the same few all day: a
    # Desktop's events come on one, a Gateway claims on one); bounded, see `parse`.
    _parsed: dict[str, dict[str, str]] = field(
        init=False, default_factory=dict, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        tokens = tuple(self.template.split("."))
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "params", tuple(t[1:-1] for t in tokens if _is_param(t)))

    def build(self, **values: str) -> str:
        """The concrete subject; every parameter is required and validated."""
        self._check_names(values)
        missing = [p for p in self.params if p not in values]
        if missing:
            raise SubjectError(f"{self.name}: missing {', '.join(missing)}")
        return ".".join(self._fill(t, values, wildcard=False) for t in self.tokens)

    def filter(self, **values: str) -> str:
        """The subject with `*` for every parameter not given (a filter or permission)."""
        self._check_names(values)
        return ".".join(self._fill(t, values, wildcard=True) for t in self.tokens)

    def parse(self, subject: str) -> dict[str, str]:
        """The parameters of a concrete subject of this family, or SubjectError. A
        stored subject of a partitioned family (one more token, the partition
        number) parses as the published one. Each valid subject is parsed once (up
        to PARSED_KEPT of them are kept; an invalid one is never kept); the caller
        gets its own copy."""
        parsed = self._parsed.get(subject)
        if parsed is None:
            parsed = self._parse(subject)
            if len(self._parsed) >= PARSED_KEPT:
                self._parsed.clear()
            self._parsed[subject] = parsed
        return dict(parsed)

    def _parse(self, subject: str) -> dict[str, str]:
        parts = subject.split(".")
        if self.partition_by and len(parts) == len(self.tokens) + 1 and parts[-1].isdigit():
            parts = parts[:-1]
        if len(parts) != len(self.tokens):
            raise SubjectError(f"{subject!r} is not a {self.name} subject")
        values: dict[str, str] = {}
        for token, part in zip(self.tokens, parts):
            if _is_param(token):
                values[token[1:-1]] = _validate(token[1:-1], part, SubjectError)
            elif token != part:
                raise SubjectError(f"{subject!r} is not a {self.name} subject")
        return values

    def partition_filter(self, partition: int) -> str:
        """The stored subjects of one partition (a consumer's filter)."""
        return f"{self.filter()}.{partition}"

    def partition_transform(self, partitions: int) -> tuple[str, str]:
        """The stream's subject transform (source, destination) that appends the
        partition number: NATS hashes the `partition_by` tokens into `partitions`."""
        if not self.partition_by:
            raise SubjectError(f"{self.name} is not partitioned")
        params = list(self.params)  # the n-th parameter is the n-th wildcard (1-based)
        dest = [
            f"{{{{wildcard({params.index(t[1:-1]) + 1})}}}}" if _is_param(t) else t
            for t in self.tokens
        ]
        keys = ",".join(str(params.index(p) + 1) for p in self.partition_by)
        return self.filter(), ".".join(dest) + f".{{{{partition({partitions},{keys})}}}}"

    def matches(self, subject: str) -> bool:
        try:
            self.parse(subject)
        except SubjectError:
            return False
        return True

    def _check_names(self, values: dict[str, str]) -> None:
        unknown = set(values) - set(self.params)
        if unknown:
            raise SubjectError(f"{self.name}: unknown parameter(s) {', '.join(sorted(unknown))}")

    @staticmethod
    def _fill(token: str, values: dict[str, str], *, wildcard: bool) -> str:
        if not _is_param(token):
            return token
        name = token[1:-1]
        if name not in values:
            return "*"
        return _validate(name, values[name], SubjectError)


def _is_param(token: str) -> bool:
    return token.startswith("{") and token.endswith("}")


def _validate(name: str, value: str, error: type[Exception]) -> str:
    try:
        return check_tenant(value) if name == "tenant" else check_token(value, name)
    except InvalidTokenError as exc:
        raise error(str(exc)) from None


def _f(
    name: str,
    template: str,
    message: str,
    publisher: str,
    consumer: str,
    delivery: Delivery,
    summary: str,
    *,
    stream: str | None = None,
    reply: str | None = None,
    partition_by: tuple[str, ...] = (),
) -> SubjectFamily:
    return SubjectFamily(
        name=name,
        template=template,
        message=message,
        publisher=publisher,
        consumer=consumer,
        delivery=delivery,
        summary=summary,
        stream=stream,
        reply=reply,
        partition_by=partition_by,
    )


J, C, R = Delivery.JETSTREAM, Delivery.CORE, Delivery.REQUEST

# --- pairing and credentials ------------------------------------------------
PAIRING_REDEEM = _f(
    "pairing.redeem",
    "cw.bootstrap.pairing.redeem",
    "pairing.redeem.request",
    "desktop (bootstrap)",
    "hub",
    R,
    "A Desktop redeems a one-time pairing code with the public key of its own nkey.",
    reply="bootstrap.sealed_reply",
)
PAIRING_REVOKE = _f(
    "pairing.revoke",
    "cw.{tenant}.pairing.{pairing_id}.revoke",
    "pairing.revoke.notice",
    "desktop",
    "hub",
    R,
    "A Desktop reports that it revoked its pairing locally (revocation is local-first).",
    reply="ack.reply",
)
CREDENTIAL_REFRESH = _f(
    "auth.refresh",
    "cw.{tenant}.auth.{principal_kind}.{principal_id}.refresh",
    "auth.refresh.request",
    "desktop, gateway, channel",
    "hub",
    R,
    "An edge asks for a fresh user JWT for the same public key before its JWT expires.",
    reply="auth.refresh.reply",
)

# --- device commands and events --------------------------------------------
DEVICE_COMMAND = _f(
    "device.command",
    "cw.{tenant}.device.{device_id}.cmd",
    "device.command",
    "hub",
    "desktop",
    C,
    "A command with its lease, or the pairing's state, pushed to one paired Desktop. "
    "PostgreSQL keeps each command until it is acknowledged and re-pushes it, in order, "
    "when the Desktop comes back, a push was lost or a lease expires.",
)
DEVICE_COMMAND_ACK = _f(
    "device.command_ack",
    "cw.{tenant}.device.{device_id}.ack",
    "device.command_ack",
    "desktop",
    "hub",
    R,
    "A Desktop acknowledges, completes or fails a command with its lease token.",
    reply="ack.reply",
)
DEVICE_EVENT = _f(
    "device.event",
    "cw.{tenant}.device.{device_id}.evt.{event_kind}",
    "device.event",
    "desktop",
    "hub",
    J,
    "Redacted runtime events leaving a Desktop (session, command and status events).",
    stream="CW_DEVICE_EVENTS",
    # One Desktop's events stay in one partition (its order); a flood from one
    # Desktop holds up only its partition's consumer, not every tenant's.
    partition_by=("tenant", "device_id"),
)

# --- presence ----------------------------------------------------------------
PRESENCE = _f(
    "presence",
    "cw.{tenant}.presence.{principal_kind}.{principal_id}",
    "presence.heartbeat",
    "desktop, gateway, channel",
    "hub",
    C,
    "Liveness heartbeats; a principal is offline after two missed intervals.",
)

# --- gateway registration ------------------------------------------------------
GATEWAY_REGISTER = _f(
    "gateway.register",
    "cw.bootstrap.gateway.register",
    "gateway.register.request",
    "gateway (bootstrap)",
    "hub",
    R,
    "A Gateway exchanges its registration credential for NATS credentials for its nkey.",
    reply="bootstrap.sealed_reply",
)
GATEWAY_HEARTBEAT = _f(
    "gateway.heartbeat",
    "cw.{tenant}.gateway.{registration_id}.heartbeat",
    "gateway.heartbeat",
    "gateway",
    "hub",
    R,
    "Gateway liveness, mode, health, load and versions; the reply may pause it.",
    reply="gateway.heartbeat.reply",
)
GATEWAY_CAPABILITIES = _f(
    "gateway.capabilities",
    "cw.{tenant}.gateway.{registration_id}.capabilities",
    "gateway.capabilities",
    "gateway",
    "hub",
    R,
    "A Gateway advertises what it can run.",
    reply="ack.reply",
)
GATEWAY_SYNC = _f(
    "gateway.sync",
    "cw.{tenant}.gateway.{registration_id}.sync.{scope}",
    "gateway.sync",
    "gateway",
    "hub",
    R,
    "External-workspace metadata within an allowed sync scope.",
    reply="ack.reply",
)

# --- Cloud-owned edge work -----------------------------------------------------
WORK_OFFER = _f(
    "work.offer",
    "cw.{tenant}.work.offers.{work_kind}",
    "work.offer",
    "hub",
    "gateway",
    C,
    "A nudge that claimable work exists; workers then claim through the hub.",
)
WORK_CLAIM = _f(
    "work.claim",
    "cw.{tenant}.work.lease.{registration_id}.claim",
    "work.claim.request",
    "gateway",
    "hub",
    R,
    "A worker claims one work item and receives a lease.",
    reply="work.claim.reply",
)
WORK_RENEW = _f(
    "work.renew",
    "cw.{tenant}.work.lease.{registration_id}.renew",
    "work.renew",
    "gateway",
    "hub",
    R,
    "A worker renews its lease while OpenCode runs.",
    reply="work.renew.reply",
)
WORK_OUTPUT = _f(
    "work.output",
    "cw.{tenant}.work.lease.{registration_id}.output",
    "work.output",
    "gateway",
    "hub",
    R,
    "A lease-fenced write: an event, a status or the result of Cloud-owned work.",
    reply="ack.reply",
)

# --- workspace live tail ------------------------------------------------------
WORKSPACE_EVENT = _f(
    "workspace.event",
    "cw.{tenant}.ws.{workspace_id}.evt",
    "workspace.event",
    "hub",
    "viewer",
    C,
    "Projected workspace events with their gapless sequence, for live viewers.",
)

# --- channels --------------------------------------------------------------------
CHANNEL_INBOUND = _f(
    "channel.inbound",
    "cw.{tenant}.chan.{instance_id}.in.{workspace_id}",
    "channel.inbound",
    "channel",
    "hub",
    J,
    "A normalised inbound chat message for the instance's bound workspace.",
    stream="CW_CHANNEL_INBOUND",
)
CHANNEL_OUTBOUND = _f(
    "channel.outbound",
    "cw.{tenant}.chan.{instance_id}.out",
    "channel.outbound",
    "hub",
    "channel",
    J,
    "A delivery for a channel instance to send to its platform.",
    stream="CW_CHANNEL_OUTBOUND",
)
CHANNEL_RECEIPT = _f(
    "channel.receipt",
    "cw.{tenant}.chan.{instance_id}.receipt",
    "channel.receipt",
    "channel",
    "hub",
    J,
    "The outcome of a delivery (sent, retried, dead-lettered).",
    stream="CW_CHANNEL_RECEIPTS",
)

# --- audit and dead letters -------------------------------------------------------
AUDIT = _f(
    "audit",
    "cw.{tenant}.audit.{principal_kind}.{principal_id}",
    "audit.record",
    "every principal",
    "hub",
    J,
    "Audit records from edges; the hub appends them to the audit log.",
    stream="CW_AUDIT",
)
DEAD_LETTER = _f(
    "deadletter",
    "cw.{tenant}.dlq.{origin}",
    "deadletter",
    "hub, channel",
    "operator",
    J,
    "A rejected or undeliverable message with the reason it was set aside.",
    stream="CW_DEADLETTER",
)
SYSTEM_DEAD_LETTER = _f(
    "deadletter.system",
    "cw.system.dlq.{origin}",
    "deadletter",
    "hub",
    "operator",
    J,
    "A rejected message whose tenant could not be determined.",
    stream="CW_DEADLETTER",
)

FAMILIES: tuple[SubjectFamily, ...] = tuple(
    value for value in globals().values() if isinstance(value, SubjectFamily)
)
BY_NAME: dict[str, SubjectFamily] = {f.name: f for f in FAMILIES}


def family_of(subject: str) -> SubjectFamily:
    """The one family a concrete subject belongs to (templates never overlap)."""
    for family in FAMILIES:
        if family.matches(subject):
            return family
    raise SubjectError(f"{subject!r} belongs to no subject family")


def dead_letter_subject(tenant: str | None, origin: SubjectFamily | str) -> str:
    """Where a rejected message goes; `origin` names the family it came from."""
    token = (origin.name if isinstance(origin, SubjectFamily) else origin).replace(".", "-")
    if tenant is None:
        return SYSTEM_DEAD_LETTER.build(origin=token)
    return DEAD_LETTER.build(tenant=tenant, origin=token)


def streams() -> dict[str, tuple[str, ...]]:
    """Each JetStream stream name with the subject filters of its families."""
    out: dict[str, list[str]] = {}
    for family in FAMILIES:
        if family.stream:
            out.setdefault(family.stream, []).append(family.filter())
    # JetStream refuses overlapping subjects in one stream: keep the widest.
    return {
        name: tuple(s for s in subjects if not any(o != s and covers(o, s) for o in subjects))
        for name, subjects in out.items()
    }


def covers(pattern: str, subject: str) -> bool:
    """Whether the (wildcard) pattern matches every subject the other one can."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def overlapping_pairs() -> Iterator[tuple[SubjectFamily, SubjectFamily]]:
    """Pairs of families that some concrete subject could match both of."""
    for i, a in enumerate(FAMILIES):
        for b in FAMILIES[i + 1 :]:
            if len(a.tokens) == len(b.tokens) and all(
                _tokens_may_meet(x, y) for x, y in zip(a.tokens, b.tokens)
            ):
                yield a, b


def _tokens_may_meet(x: str, y: str) -> bool:
    if _is_param(x) and _is_param(y):
        return True
    if _is_param(x) or _is_param(y):
        param, literal = (x, y) if _is_param(x) else (y, x)
        return not (param == "{tenant}" and literal in RESERVED_TENANTS)
    return x == y


# --- per-principal names the server's permissions are written against --------------
# Edges and the hub both derive these from here, so a permission and the name a
# client uses can never disagree.
EDGE_CONSUMERS = {"channel": "CW_CHANNEL_OUTBOUND"}


def inbox_prefix(tenant: str, principal_kind: str, principal_id: str) -> str:
    """The private reply-inbox prefix of one principal (pass as nats-py `inbox_prefix`).

    Replies to a principal's requests arrive under it, and only that principal may
    subscribe there, so no one can read another principal's replies.
    """
    tenant = _validate("tenant", tenant, SubjectError)
    return "_INBOX." + ".".join(
        [
            tenant,
            _validate("principal_kind", principal_kind, SubjectError),
            _validate("principal_id", principal_id, SubjectError),
        ]
    )


def edge_consumer(principal_kind: str, principal_id: str) -> str:
    """The durable JetStream consumer an edge pulls its stored work from."""
    name = (
        f"{_validate('principal_kind', principal_kind, SubjectError)}-"
        f"{_validate('principal_id', principal_id, SubjectError)}"
    )
    return name
