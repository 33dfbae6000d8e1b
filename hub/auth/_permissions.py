"""Who may publish and subscribe where: one table, built from the subject taxonomy.

Each principal kind has a row of grants. A grant names a subject family and how
its parameters are pinned: to the principal's own tenant and id, to each of its
allowed workspaces, or to a literal. The NATS server enforces the result (it is
written into the principal's user JWT), so tenant isolation and "own subjects
only" do not depend on hub code paths.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypedDict

from schemas import CredentialScope, PrincipalKind, subjects
from schemas.subjects import SubjectFamily

OWN = "<own id>"  # the principal's own id
EACH_WORKSPACE = "<each allowed workspace>"


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    tenant: str
    id: str
    workspaces: tuple[str, ...] = ()
    scopes: frozenset[CredentialScope] = frozenset()


@dataclass(frozen=True)
class Grant:
    action: str  # "pub" or "sub"
    family: SubjectFamily
    pins: dict[str, str] = field(default_factory=dict)
    scope: CredentialScope | None = None  # granted only when the principal holds it

    def subjects_for(self, p: Principal) -> list[str]:
        if self.scope is not None and self.scope not in p.scopes:
            return []
        fixed = {k: (p.id if v == OWN else v) for k, v in self.pins.items() if v != EACH_WORKSPACE}
        if "tenant" in self.family.params:
            fixed["tenant"] = p.tenant
        each = [k for k, v in self.pins.items() if v == EACH_WORKSPACE]
        if not each:
            return [self.family.filter(**fixed)]
        return [self.family.filter(**fixed, **{each[0]: w}) for w in p.workspaces]


@dataclass(frozen=True)
class Permissions:
    pub_allow: tuple[str, ...]
    sub_allow: tuple[str, ...]
    allow_responses: bool = False


def pub(family: SubjectFamily, scope: CredentialScope | None = None, **pins: str) -> Grant:
    return Grant("pub", family, pins, scope)


def sub(family: SubjectFamily, scope: CredentialScope | None = None, **pins: str) -> Grant:
    return Grant("sub", family, pins, scope)


class _SelfPins(TypedDict):
    principal_kind: str
    principal_id: str


def _self(kind: str) -> _SelfPins:
    return {"principal_kind": kind, "principal_id": OWN}


S = subjects
C = CredentialScope

# The table. Every edge also gets its private reply inbox and, where it pulls
# stored work, its own durable consumer (added in permissions_for).
TABLE: dict[PrincipalKind, tuple[Grant, ...]] = {
    PrincipalKind.DESKTOP: (
        sub(S.DEVICE_COMMAND, device_id=OWN),
        pub(S.DEVICE_EVENT, device_id=OWN),
        pub(S.DEVICE_COMMAND_ACK, device_id=OWN),
        pub(S.PAIRING_REVOKE, pairing_id=OWN),
        pub(S.PRESENCE, **_self("desktop")),
        pub(S.AUDIT, **_self("desktop")),
        pub(S.CREDENTIAL_REFRESH, **_self("desktop")),
    ),
    PrincipalKind.GATEWAY: (
        pub(S.GATEWAY_HEARTBEAT, C.HEARTBEAT, registration_id=OWN),
        pub(S.PRESENCE, C.HEARTBEAT, **_self("gateway")),
        pub(S.GATEWAY_CAPABILITIES, C.CAPABILITIES, registration_id=OWN),
        pub(S.GATEWAY_SYNC, C.METADATA_SYNC, registration_id=OWN),
        sub(S.WORK_OFFER, C.EDGE_CLAIM),
        pub(S.WORK_CLAIM, C.EDGE_CLAIM, registration_id=OWN),
        pub(S.WORK_RENEW, C.EDGE_LEASE_RENEW, registration_id=OWN),
        pub(S.WORK_OUTPUT, C.EDGE_WRITE_FENCED_OUTPUT, registration_id=OWN),
        pub(S.AUDIT, **_self("gateway")),
        pub(S.CREDENTIAL_REFRESH, **_self("gateway")),
    ),
    PrincipalKind.CHANNEL: (
        pub(S.CHANNEL_INBOUND, instance_id=OWN, workspace_id=EACH_WORKSPACE),
        pub(S.CHANNEL_RECEIPT, instance_id=OWN),
        pub(S.PRESENCE, **_self("channel")),
        pub(S.AUDIT, **_self("channel")),
        pub(S.CREDENTIAL_REFRESH, **_self("channel")),
    ),
    PrincipalKind.VIEWER: (sub(S.WORKSPACE_EVENT, workspace_id=EACH_WORKSPACE),),
    PrincipalKind.ADMIN: (
        # A tenant's operator tool observes its tenant (dead letters, audit, presence)
        # but publishes nothing on the bus; changes go through the admin HTTP API.
        sub(S.DEAD_LETTER),
        sub(S.AUDIT),
        sub(S.PRESENCE),
        sub(S.WORKSPACE_EVENT),
    ),
}

# The hub itself: every cw subject, the JetStream API, its replicas' partition
# leases (hub/core/_leases.py), and replies to any request it received
# (allow_responses), but nothing in $SYS (a separate system user does account
# updates).
HUB_PERMISSIONS = Permissions(
    pub_allow=("cw.>", "$JS.API.>", "$JS.ACK.>", "$KV.CW_HUB_LEASES.>", "_INBOX.hub.>"),
    sub_allow=("cw.>", "_INBOX.hub.>"),
    allow_responses=True,
)
HUB_INBOX_PREFIX = "_INBOX.hub"


# KV buckets (hub/core/_streams.py KV_BUCKETS) in which a principal kind may put and
# read its own keys, `<tenant>.<own id>.*`, and nothing else: not list, watch,
# delete, nor look at the bucket's stream.
OWN_KV_KEYS: dict[PrincipalKind, tuple[str, ...]] = {
    # the sent-ledger (channels/runtime/_sent_store.py), the outbound transport's
    # lease and cursor (channels/runtime/_transport_state.py)
    PrincipalKind.CHANNEL: ("CW_CHANNEL_SENT", "CW_CHANNEL_LEASES", "CW_CHANNEL_CURSORS"),
}


def _kv_grants(p: Principal) -> list[str]:
    """A put is a publish to the key's subject (the ack comes to the own inbox); a
    get is nats-py's direct get of the key's last message, whose subject names the
    key (`$JS.API.DIRECT.GET.<stream>.<key subject>`, empty body). The handle is
    built without stream info, so no STREAM.INFO grant is needed."""
    grants = []
    for bucket in OWN_KV_KEYS.get(p.kind, ()):
        keys = f"$KV.{bucket}.{p.tenant}.{p.id}.>"
        grants += [keys, f"$JS.API.DIRECT.GET.KV_{bucket}.{keys}"]
    return grants


def _consumer_grants(p: Principal) -> list[str]:
    """Publish rights to pull from, inspect and ack its own durable consumer only."""
    stream = subjects.EDGE_CONSUMERS.get(str(p.kind))
    if stream is None:
        return []
    durable = subjects.edge_consumer(str(p.kind), p.id)
    return [
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def permissions_for(p: Principal) -> Permissions:
    if p.kind == PrincipalKind.HUB:
        return HUB_PERMISSIONS
    publish: list[str] = []
    subscribe: list[str] = []
    for grant in TABLE[p.kind]:
        (publish if grant.action == "pub" else subscribe).extend(grant.subjects_for(p))
    publish.extend(_consumer_grants(p))
    publish.extend(_kv_grants(p))
    if publish:  # anyone who sends requests or JetStream publishes needs its own inbox
        subscribe.append(subjects.inbox_prefix(p.tenant, str(p.kind), p.id) + ".>")
    return Permissions(pub_allow=_unique(publish), sub_allow=_unique(subscribe))


@dataclass(frozen=True)
class EdgeLimits:
    """NATS limits written into an edge's user JWT, enforced by the server: `payload`
    is the largest message it may publish (a larger one is refused and the
    connection closed), `subs` how many subscriptions one connection may hold.
    (nats-server does not enforce the JWT's `data` field, so it stays unlimited.)"""

    payload: int
    subs: int

    def claims(self) -> dict[str, int]:
        return {"payload": self.payload, "subs": self.subs}


# Viewers and admin tools publish nothing; their payload cap only bounds what a
# stolen credential could push at the server before the permission check.
OBSERVER_MAX_PAYLOAD = 4096


def edge_limits(
    *,
    desktop_payload: int,
    gateway_payload: int,
    channel_payload: int,
    subscriptions: int,
) -> dict[PrincipalKind, EdgeLimits]:
    """Limits per edge kind (HubSettings `*_max_payload_bytes`, `edge_max_subscriptions`).
    The hub's own user is not an edge and has none."""
    payloads = {
        PrincipalKind.DESKTOP: desktop_payload,
        PrincipalKind.GATEWAY: gateway_payload,
        PrincipalKind.CHANNEL: channel_payload,
        PrincipalKind.VIEWER: OBSERVER_MAX_PAYLOAD,
        PrincipalKind.ADMIN: OBSERVER_MAX_PAYLOAD,
    }
    return {kind: EdgeLimits(payload, subscriptions) for kind, payload in payloads.items()}


DEFAULT_EDGE_LIMITS = edge_limits(
    desktop_payload=1024 * 1024,
    gateway_payload=1024 * 1024,
    channel_payload=1024 * 1024,
    subscriptions=1000,
)


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def permission_table_markdown() -> str:
    """The table above, rendered for docs/permissions.md (kept in step by a test)."""
    example = {
        PrincipalKind.DESKTOP: Principal(PrincipalKind.DESKTOP, "acme", "pair1"),
        PrincipalKind.GATEWAY: Principal(
            PrincipalKind.GATEWAY, "acme", "reg1", scopes=frozenset(CredentialScope)
        ),
        PrincipalKind.CHANNEL: Principal(
            PrincipalKind.CHANNEL, "acme", "telegram", workspaces=("ws1",)
        ),
        PrincipalKind.VIEWER: Principal(
            PrincipalKind.VIEWER, "acme", "web1", workspaces=("ws1", "ws2")
        ),
        PrincipalKind.ADMIN: Principal(PrincipalKind.ADMIN, "acme", "ops"),
    }
    lines = [
        "# Bus permissions",
        "",
        "Generated from `hub/auth/_permissions.py` by `cowork schema export`; do not edit.",
        "Examples use tenant `acme`. Every principal may use only what is listed;",
        "everything else is denied by the NATS server.",
        "",
        "| principal | grant | subject | needs scope |",
        "|---|---|---|---|",
    ]
    for kind, principal in example.items():
        for grant in TABLE[kind]:
            for subject in grant.subjects_for(principal):
                scope = f"`{grant.scope.value}`" if grant.scope else "-"
                lines.append(
                    f"| {kind.value} `{principal.id}` | {grant.action} "
                    f"({grant.family.name}) | `{subject}` | {scope} |"
                )
        perms = permissions_for(principal)
        for subject in _consumer_grants(principal):
            lines.append(
                f"| {kind.value} `{principal.id}` | pub (own durable consumer) | `{subject}` | - |"
            )
        for subject in _kv_grants(principal):
            lines.append(f"| {kind.value} `{principal.id}` | pub (own KV keys) | `{subject}` | - |")
        for subject in perms.sub_allow:
            if subject.startswith("_INBOX"):
                lines.append(
                    f"| {kind.value} `{principal.id}` | sub (own reply inbox) | `{subject}` | - |"
                )
    for subject in HUB_PERMISSIONS.pub_allow:
        lines.append(f"| hub | pub | `{subject}` | - |")
    for subject in HUB_PERMISSIONS.sub_allow:
        lines.append(f"| hub | sub | `{subject}` | - |")
    lines.append("| hub | replies | any request it received (`allow_responses`) | - |")
    return "\n".join(lines) + "\n"
