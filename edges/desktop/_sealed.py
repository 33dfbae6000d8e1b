"""The Desktop's side of a sealed pairing: its trust mode, its controllers, the checks
every controller command passes, and the content keys that seal what it sends.

Local state, in the state directory (owner-only, like the rest):

    sealed.json               trust mode (`hub` | `sealed`) and the enrolled controllers;
                              written by `cowork desktop trust|controllers` on this machine,
                              and by the agent when a controller presents a valid invite
    controller-requests.json  enrolment requests relayed by the hub, waiting for a person
    controller-invites.json   one-time invites made here (`controllers invite`): the
                              SHA-256 of each secret, its expiry, and when it was used
    desktop-seal.key          the Desktop's X25519 key (controllers seal payloads to it)
    desktop.db                the replay window: the last sequence of each controller

The running agent reads `sealed.json` again whenever it changes, so a switch of
trust or a removed controller applies to the very next command, and to every event
that reaches the relay after it (events check the file once per event-loop turn:
`SealedGuard._event_trust`). Nothing
the hub sends changes any of it: a relayed enrolment request only waits here, and
one that presents an invite enrols only if it holds the invite's secret, which the
hub never sees (the controller seals it to this Desktop's key, bound to its own).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from schemas import (
    CommandKind,
    CommandResult,
    CommandStatus,
    ControllerEnrolPayload,
    DeviceCommand,
    SealError,
    content_aad,
    invite_aad,
    new_id,
    payload_hash,
)

from ..common import (
    ContentKey,
    ControllerPublic,
    DesktopSealingKey,
    InviteLink,
    normalise_fingerprint,
    now_iso,
    write_private,
)
from ._store import DesktopStore, StoreError

log = logging.getLogger("cowork.edge.desktop")

Trust = Literal["hub", "sealed"]
TRUST_FILE, REQUESTS_FILE, KEY_FILE = "sealed.json", "controller-requests.json", "desktop-seal.key"
INVITES_FILE = "controller-invites.json"
MAX_CLOCK_SKEW = 60  # seconds a controller's clock may run ahead of the Desktop's
MAX_LIFETIME = 900  # a command may be valid this long at most
KEY_WINDOW = 3600.0  # a content key seals at most this long
MAX_PENDING = 16
PENDING_SECONDS = 600
MAX_INVITE_TTL = 86400.0  # an invite lives a day at most
MAX_INVITES = 16  # open (unused, unexpired) invites at a time
INVITE_MEMORY = 86400.0  # a used or expired invite is remembered this long past its expiry


M = TypeVar("M", bound=BaseModel)


def typed_payload(
    model: type[M], command: DeviceCommand, area: str, what: str
) -> M | CommandResult:
    """A command's payload as `model`, or the failed result (`<area>.invalid`) to answer."""
    try:
        return model.model_validate(command.payload or {})
    except ValidationError as exc:
        return CommandResult(
            ok=False,
            status=CommandStatus.FAILED,
            code=f"{area}.invalid",
            message=f"invalid {what}: {exc.errors()[0]['msg']}",
        )


class SealedRefusal(Exception):
    """A controller command this Desktop refuses; `code` goes into the result."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def result(self) -> CommandResult:
        return CommandResult(
            ok=False, status=CommandStatus.BLOCKED_BY_POLICY, code=self.code, message=str(self)
        )


@dataclass
class TrustFile:
    trust: Trust = "hub"
    controllers: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> fields

    _parsed: dict[str, ControllerPublic] = field(default_factory=dict, repr=False)

    def controller(self, controller_id: str) -> ControllerPublic | None:
        """The enrolled controller, parsed once per reading of the file."""
        known = self._parsed.get(controller_id)
        if known is not None:
            return known
        entry = self.controllers.get(controller_id)
        if entry is None:
            return None
        known = ControllerPublic(entry["label"], entry["signingKey"], entry["encryptionKey"])
        self._parsed[controller_id] = known
        return known


def _path(store: DesktopStore, name: str) -> Path:
    return store.directory / name


def _read_json(store: DesktopStore, name: str) -> dict[str, Any] | None:
    path = _path(store, name)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is damaged: {exc}") from None
    if not isinstance(value, dict):
        raise StoreError(f"{path} is damaged: not a JSON object")
    return value


def load_trust(store: DesktopStore) -> TrustFile:
    raw = _read_json(store, TRUST_FILE)
    if raw is None:
        return TrustFile()
    trust, controllers = raw.get("trust"), raw.get("controllers", {})
    if trust not in ("hub", "sealed") or not isinstance(controllers, dict):
        raise StoreError(f"{_path(store, TRUST_FILE)} is damaged: no trust mode or controllers")
    return TrustFile(trust=trust, controllers=dict(controllers))


def save_trust(store: DesktopStore, trust: TrustFile) -> None:
    store.ensure_dir()
    body = {"trust": trust.trust, "controllers": trust.controllers}
    write_private(_path(store, TRUST_FILE), json.dumps(body, indent=2))


def load_requests(store: DesktopStore) -> dict[str, dict[str, str]]:
    try:
        requests = _read_json(store, REQUESTS_FILE) or {}
    except StoreError:  # only waiting requests: a damaged file is an empty list
        return {}
    cutoff = time.time() - PENDING_SECONDS
    return {k: v for k, v in requests.items() if float(v.get("requestedAt", 0)) > cutoff}


def sealing_key(store: DesktopStore) -> DesktopSealingKey:
    """The Desktop's X25519 key, made on first use."""
    path = _path(store, KEY_FILE)
    try:
        return DesktopSealingKey.from_text(path.read_text())
    except FileNotFoundError:
        store.ensure_dir()
        key = DesktopSealingKey.generate()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made meanwhile by another process: use that one
            return DesktopSealingKey.from_text(path.read_text())
        with os.fdopen(fd, "w") as f:
            f.write(key.to_text())
        return key


def _add_controller(store: DesktopStore, controller: ControllerPublic, **audit: Any) -> None:
    trust = load_trust(store)
    trust.controllers[controller.controller_id] = {
        "label": controller.label,
        "signingKey": controller.signing_key,
        "encryptionKey": controller.encryption_key,
        "fingerprint": controller.fingerprint,
        "addedAt": now_iso(),
    }
    save_trust(store, trust)
    store.audit(
        "controller.added",
        controllerId=controller.controller_id,
        fingerprint=controller.fingerprint,
        **audit,
    )


def enrol(store: DesktopStore, fingerprint_text: str) -> ControllerPublic:
    """A person on this machine approves a pending request by its fingerprint."""
    wanted = normalise_fingerprint(fingerprint_text)
    for request in load_requests(store).values():
        controller = ControllerPublic(
            request["label"], request["signingKey"], request["encryptionKey"]
        )
        if controller.fingerprint == wanted:
            _add_controller(store, controller)
            return controller
    raise KeyError(f"no pending enrolment request with fingerprint {wanted}")


def _secret_hash(secret: bytes) -> str:
    return hashlib.sha256(b"cowork-invite-v1" + secret).hexdigest()


def load_invites(store: DesktopStore) -> dict[str, dict[str, Any]]:
    """The invites still remembered (a used or expired one for a day, so that it is
    refused as used or expired rather than unknown)."""
    try:
        invites = _read_json(store, INVITES_FILE) or {}
    except StoreError:  # fail closed: no invite is valid until it is made again
        return {}
    cutoff = time.time() - INVITE_MEMORY
    return {k: v for k, v in invites.items() if float(v.get("expiresAt", 0)) > cutoff}


@contextlib.contextmanager
def _invites_locked(store: DesktopStore) -> Iterator[None]:
    """Held around each read-modify-write of the invites file: the CLI (`controllers
    invite`) and the running agent (an enrolment) write it from two processes, and an
    invite must never be used twice nor a new one lost to an interleaved write."""
    store.ensure_dir()
    with open(_path(store, INVITES_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _save_invites(store: DesktopStore, invites: dict[str, dict[str, Any]]) -> None:
    store.ensure_dir()
    write_private(_path(store, INVITES_FILE), json.dumps(invites, indent=2))


def create_invite(
    store: DesktopStore, ttl: float, hub_url: str | None = None, *, now: float | None = None
) -> InviteLink:
    """A one-time invite: a random secret of which only a hash is kept here. Whoever
    holds the link may enrol one controller, once, within `ttl` seconds."""
    if not 0 < ttl <= MAX_INVITE_TTL:
        raise ValueError(f"an invite lives between 1 second and {MAX_INVITE_TTL:g} seconds")
    pairing = store.load_pairing()
    now = time.time() if now is None else now
    with _invites_locked(store):
        invite_id, secret = _add_invite(store, ttl, now)
    store.audit("controller.invite_created", inviteId=invite_id, expiresAt=now + ttl)
    secret_text = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
    return InviteLink(
        pairing.tenant,
        pairing.pairing_id,
        invite_id,
        secret_text,
        sealing_key(store).public,
        hub_url,
    )


def _add_invite(store: DesktopStore, ttl: float, now: float) -> tuple[str, bytes]:
    invites = load_invites(store)
    open_ = [v for v in invites.values() if not v.get("usedAt") and v["expiresAt"] > now]
    if len(open_) >= MAX_INVITES:
        raise ValueError(f"{MAX_INVITES} invites are open already; let some expire first")
    secret = os.urandom(32)
    invite_id = "inv" + new_id()
    invites[invite_id] = {
        "secretHash": _secret_hash(secret),
        "createdAt": now,
        "expiresAt": now + ttl,
    }
    _save_invites(store, invites)
    return invite_id, secret


def remove(store: DesktopStore, which: str) -> str:
    trust = load_trust(store)
    wanted = normalise_fingerprint(which)
    for cid, entry in list(trust.controllers.items()):
        if which in (cid, entry.get("label")) or entry.get("fingerprint") == wanted:
            del trust.controllers[cid]
            save_trust(store, trust)
            store.audit("controller.removed", controllerId=cid)
            return cid
    raise KeyError(f"no enrolled controller {which!r}")


def set_trust(store: DesktopStore, mode: Trust) -> TrustFile:
    trust = load_trust(store)
    if trust.trust != mode:
        trust.trust = mode
        save_trust(store, trust)
        store.audit("pairing.trust_changed", trust=mode)
    return trust


class SealedGuard:
    """What the agent asks: is this pairing sealed, may this command run (and with
    what payload), and what does sealed content look like."""

    def __init__(self, store: DesktopStore, tenant: str, pairing_id: str) -> None:
        self.store, self.tenant, self.pairing_id = store, tenant, pairing_id
        self.key = sealing_key(store)
        self._trust_path = str(_path(store, TRUST_FILE))
        self._seen: tuple[int, int, int] | None = None
        # The replay window as this process took it (it is desktop.db's only writer):
        # the check reads memory, the take still writes through to SQLite.
        self._last_sequence: dict[str, int] = {}
        self._trust = TrustFile()
        self._recipients: dict[str, str] = {}  # controller id -> X25519 key, as enrolled now
        self._content: ContentKey | None = None
        self._turn_trust: Trust | None = None  # the events' answer for this loop turn
        self._refresh()

    def _refresh(self) -> TrustFile:
        """The trust file as it is now (a stat per call; read again only if it changed)."""
        try:
            st = os.stat(self._trust_path)
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            seen = (0, 0, 0)
        if seen != self._seen:
            self._turn_trust = None  # a newer reading: the turn's answer is stale
            try:
                self._trust = load_trust(self.store)
            except StoreError as exc:  # fail closed: sealed, to nobody, until it is repaired
                log.error("desktop.trust_file_damaged: %s; sealed to no controller", exc)
                self._trust = TrustFile(trust="sealed")
            self._seen = seen
            self._recipients = {
                cid: entry["encryptionKey"] for cid, entry in self._trust.controllers.items()
            }
        return self._trust

    @property
    def sealed(self) -> bool:
        return self._refresh().trust == "sealed"

    # --- commands ---------------------------------------------------------------------
    def check(self, command: DeviceCommand) -> DeviceCommand:
        """The command with its payload opened, or SealedRefusal with a code. Order:
        key, signature, freshness, replay, binding, payload."""
        trust = self._refresh()
        signed = command.signed
        if signed is None:
            # An enrolment request only waits here for a person (or presents an
            # invite made here): it needs no signature.
            if command.kind == CommandKind.POLICY_SET:
                raise SealedRefusal(
                    "sealed.unsigned", "a policy change must be signed by an enrolled controller"
                )
            if trust.trust == "sealed" and command.kind != CommandKind.CONTROLLER_ENROL:
                raise SealedRefusal(
                    "sealed.unsigned", "this Desktop is sealed: commands must be signed"
                )
            return command
        claims = signed.claims
        controller = trust.controller(claims.controller_id)
        if controller is None:
            raise SealedRefusal(
                "sealed.unknown_controller", f"{claims.controller_id} is not an enrolled controller"
            )
        if not controller.verify(signed):
            raise SealedRefusal("sealed.bad_signature", "the signature does not verify")
        now = time.time()
        if claims.issued_at > now + MAX_CLOCK_SKEW:
            raise SealedRefusal("sealed.not_yet_valid", "issued in the future")
        if claims.expires_at <= now or claims.expires_at - claims.issued_at > MAX_LIFETIME:
            raise SealedRefusal("sealed.expired", "the command has expired")
        last = self._last_sequence.get(claims.controller_id)
        if last is None:
            last = self._last_sequence[claims.controller_id] = self.store.controller_sequence(
                claims.controller_id
            )
        if claims.controller_sequence <= last:
            raise SealedRefusal(
                "sealed.replayed",
                f"sequence {claims.controller_sequence} of {claims.controller_id} was used "
                "or passed already",
            )
        bound = {
            "tenant": (claims.tenant, self.tenant),
            "pairing": (claims.pairing_id, command.pairing_id),
            "command": (claims.command_id, command.id),
            "kind": (claims.kind, command.kind),
            "workspace": (claims.workspace_id, command.workspace_id),
            "session": (claims.session_id, command.session_id),
        }
        wrong = [name for name, (signed_for, got) in bound.items() if signed_for != got]
        if claims.pairing_id != self.pairing_id:
            wrong.append("pairing")
        if wrong:
            raise SealedRefusal(
                "sealed.wrong_binding", f"signed for another {', '.join(sorted(set(wrong)))}"
            )
        if (
            command.payload is not None
            or payload_hash(signed.sealed_payload) != claims.payload_hash
        ):
            raise SealedRefusal("sealed.payload_mismatch", "the payload is not the one signed")
        try:
            payload = self.key.open_payload(signed)
        except (SealError, ValueError) as exc:
            raise SealedRefusal(
                "sealed.undecryptable", f"the payload does not open: {exc}"
            ) from None
        if not self.store.advance_controller(claims.controller_id, claims.controller_sequence):
            self._last_sequence.pop(claims.controller_id, None)  # read it again next time
            raise SealedRefusal("sealed.replayed", "the sequence was used meanwhile")
        self._last_sequence[claims.controller_id] = claims.controller_sequence
        return command.model_copy(update={"payload": payload})

    def enrolment_request(self, command: DeviceCommand) -> CommandResult:
        """Record a relayed enrolment request; a person approves it here, or not."""
        request = typed_payload(ControllerEnrolPayload, command, "controller", "enrolment request")
        if isinstance(request, CommandResult):
            return request
        controller = ControllerPublic(request.label, request.signing_key, request.encryption_key)
        if request.invite is not None:
            return self._enrol_by_invite(request, controller)
        requests = load_requests(self.store)
        if len(requests) >= MAX_PENDING and controller.controller_id not in requests:
            return CommandResult(
                ok=False,
                status=CommandStatus.BLOCKED_BY_POLICY,
                code="controller.too_many_requests",
                message=f"{MAX_PENDING} enrolment requests are waiting already",
            )
        requests[controller.controller_id] = {
            **request.model_dump(by_alias=True),
            "requestedAt": str(time.time()),
            "commandId": command.id,
        }
        write_private(_path(self.store, REQUESTS_FILE), json.dumps(requests, indent=2))
        self.store.audit(
            "controller.requested",
            controllerId=controller.controller_id,
            fingerprint=controller.fingerprint,
            label=controller.label,
        )
        return CommandResult(
            ok=True,
            status=CommandStatus.REQUIRES_LOCAL_CONFIRMATION,
            code="controller.pending_approval",
            message=(
                f"approve on the Desktop: cowork desktop controllers add {controller.fingerprint}"
            ),
            data={
                "controllerId": controller.controller_id,
                "controllerFingerprint": controller.fingerprint,
                "desktopKey": self.key.public,
                "desktopFingerprint": self.key.fingerprint,
            },
        )

    def _enrol_by_invite(
        self, request: ControllerEnrolPayload, controller: ControllerPublic
    ) -> CommandResult:
        """Enrol at once a controller that holds a valid invite's secret; refuse with
        `invite.unknown|invalid|used|expired` otherwise. The secret comes sealed to this
        Desktop's key, bound to the controller's keys and label: the hub cannot read
        it, nor present it with keys of its own."""
        with _invites_locked(self.store):  # checked and spent in one step
            return self._use_invite(request, controller)

    def _use_invite(
        self, request: ControllerEnrolPayload, controller: ControllerPublic
    ) -> CommandResult:
        assert request.invite is not None
        invite_id = request.invite.id
        invites = load_invites(self.store)
        entry = invites.get(invite_id)
        code: str | None = None
        if entry is None:
            code, message = "invite.unknown", "no such invite on this Desktop"
        else:
            aad = invite_aad(
                self.tenant,
                self.pairing_id,
                invite_id,
                controller.label,
                controller.signing_key,
                controller.encryption_key,
            )
            try:
                secret = self.key.open_invite(request.invite, aad)
            except SealError:
                secret = b""
            if not hmac.compare_digest(_secret_hash(secret), str(entry.get("secretHash"))):
                code, message = "invite.invalid", "the invite's secret does not match"
            elif entry.get("usedAt"):
                code, message = "invite.used", "this invite was used already"
            elif float(entry["expiresAt"]) <= time.time():
                code, message = "invite.expired", "this invite has expired"
        if code is not None:
            self.store.audit(
                "controller.invite_refused",
                code=code,
                inviteId=invite_id,
                controllerId=controller.controller_id,
            )
            return CommandResult(
                ok=False, status=CommandStatus.BLOCKED_BY_POLICY, code=code, message=message
            )
        assert entry is not None
        entry.update(usedAt=time.time(), controllerId=controller.controller_id)
        _save_invites(self.store, invites)  # used before the controller counts
        _add_controller(self.store, controller, inviteId=invite_id)
        return CommandResult(
            ok=True,
            status=CommandStatus.COMPLETED,
            code="controller.enrolled",
            message=f"enrolled {controller.label!r} with an invite made on this Desktop",
            data={
                "controllerId": controller.controller_id,
                "controllerFingerprint": controller.fingerprint,
                "desktopKey": self.key.public,
                "desktopFingerprint": self.key.fingerprint,
            },
        )

    # --- content ----------------------------------------------------------------------
    def _content_key(self) -> ContentKey:
        """The current content key (call `_refresh` first)."""
        recipients = self._recipients
        key = self._content
        if (
            key is None
            or key.recipients != recipients
            or time.monotonic() - key.made_at > KEY_WINDOW
        ):
            key = self._content = ContentKey(recipients)
        return key

    def seal_event(self, event_id: str, payload: dict) -> dict:
        """An event's payload as it leaves the Desktop: sealed on a sealed pairing."""
        if self._event_trust() != "sealed":
            return payload
        return self.seal_payload("event", event_id, payload)

    def _event_trust(self) -> Trust:
        """The trust mode for events, from one `stat` of sealed.json per event-loop turn
        (a streamed burst is up to hundreds of events a turn; a stat each was about
        8% of the relay's time).

        What it keeps: an event that reaches this process after sealed.json was
        replaced is sealed. The answer is taken at the turn's first event and
        forgotten by a callback queued right then, which runs first thing in the
        next turn: before the task that reads OpenCode's stream (relay.run) can be
        woken by data received after the stat (asyncio runs a wake-up queued in one
        turn in the next, behind the callbacks already queued). So every event
        decided by an answer had reached the relay before the stat that gave it,
        as when each event made its own stat. A reading that sees the file change
        (a command's check) forgets the answer at once; without a running loop
        every event stats."""
        trust = self._turn_trust
        if trust is None:
            trust = self._refresh().trust
            try:
                asyncio.get_running_loop().call_soon(self._end_turn)
            except RuntimeError:
                return trust
            self._turn_trust = trust
        return trust

    def _end_turn(self) -> None:
        self._turn_trust = None

    def seal_payload(self, purpose: Literal["event", "result"], id: str, value: Any) -> dict:
        plain = json.dumps(value, separators=(",", ":")).encode()
        aad = content_aad(self.tenant, self.pairing_id, purpose, id)
        return {"sealed": self._content_key().seal_json(plain, aad)}

    def seal_result(self, command_id: str, result: CommandResult) -> CommandResult:
        """What leaves the Desktop: ok, status and refusal code in clear, the rest sealed."""
        self._refresh()
        body = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        aad = content_aad(self.tenant, self.pairing_id, "result", command_id)
        sealed = self._content_key().seal(json.dumps(body).encode(), aad)
        return CommandResult(ok=result.ok, status=result.status, code=result.code, sealed=sealed)


def trust_summary(store: DesktopStore) -> dict[str, Any]:
    trust = load_trust(store)
    key = sealing_key(store)
    return {
        "trust": trust.trust,
        "desktopFingerprint": key.fingerprint,
        "controllers": [
            {"id": cid, **{k: v for k, v in e.items() if k in ("label", "fingerprint", "addedAt")}}
            for cid, e in trust.controllers.items()
        ],
        "pending": [
            {
                "fingerprint": ControllerPublic(
                    r["label"], r["signingKey"], r["encryptionKey"]
                ).fingerprint,
                "label": r["label"],
                "requestedAt": datetime.fromtimestamp(float(r["requestedAt"]), UTC).isoformat(),
            }
            for cid, r in load_requests(store).items()
            if cid not in trust.controllers
        ],
        "invites": [
            {
                "id": iid,
                "expiresAt": datetime.fromtimestamp(float(i["expiresAt"]), UTC).isoformat(),
                "state": "used"
                if i.get("usedAt")
                else ("expired" if float(i["expiresAt"]) <= time.time() else "open"),
                **({"controllerId": i["controllerId"]} if i.get("controllerId") else {}),
            }
            for iid, i in load_invites(store).items()
        ],
    }
