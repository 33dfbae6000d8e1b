"""Sealed pairings against real parts: operator-mode NATS, PostgreSQL, the hub, a real
`opencode serve` (fake model) and the Desktop agent. The attacker holds what the hub
holds: its NATS connection and credentials, and its write path into PostgreSQL
(`hub.commands.submit` writes any row it is given; PATCH writes any policy)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import UTC, datetime, timedelta

import pytest
from desktopkit import TENANT, cowork, eventually, get_pairing
from nats.js.errors import NotFoundError
from sealedkit import enrolled_controller, seal

from edges.common import ControllerKeys, DesktopSealingKey, InviteLink
from edges.desktop._sealed import create_invite, load_trust, set_trust, trust_summary
from edges.desktop._store import DesktopStore
from edges.remote import ControllerStore, PairingLink, RemoteClient, RemoteError
from schemas import (
    DeviceCommand,
    DeviceEvent,
    Envelope,
    Lease,
    PairingPolicy,
    PairingState,
    PrincipalKind,
    Source,
    b64url,
    subjects,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def hub_options():
    return {"command_lease_seconds": 10}


async def _forge(hub, pid: str, body: dict, wait: float = 20.0) -> dict:
    """Write a command row as the hub's own code does (no HTTP checks), push it, and
    return the row once the Desktop's answer made it final."""
    fields = {
        "id": body.get("id"),
        "kind": body["kind"],
        "workspace_id": body.get("workspaceId", "local"),
        "session_id": body.get("sessionId"),
        "payload": body.get("payload"),
        "signed": body.get("signed"),
    }
    outcome = await hub.commands.submit(TENANT, pid, {k: v for k, v in fields.items() if v})
    row = await hub.commands.wait_final(TENANT, pid, outcome["command_id"], wait)
    assert row["state"] == "done", row
    return row


def _signed_by(
    keys: ControllerKeys,
    pid: str,
    desktop_key: str,
    kind: str,
    session: str | None,
    payload: dict | None,
    controller_id: str | None = None,
) -> dict:
    """The body of a command signed by `keys` (under another controller's id if given)."""
    signed = keys.sign(
        tenant=TENANT,
        pairing_id=pid,
        command_id="cmdforged" + str(time.time_ns()),
        sequence=10_000,
        kind=kind,
        workspace_id="local",
        session_id=session,
        payload=payload,
        desktop_key=desktop_key,
    )
    if controller_id:
        claims = signed.claims.model_copy(update={"controller_id": controller_id})
        signed = signed.model_copy(update={"claims": claims})
    body = {
        "id": signed.claims.command_id,
        "kind": kind,
        "signed": signed.model_dump(mode="json", by_alias=True),
    }
    return {**body, "sessionId": session} if session else body


def _refusal(row: dict) -> str:
    result = row["result"]
    assert result["ok"] is False and result["status"] == "blocked_by_policy", result
    return result["code"]


async def test_what_holds_the_hub_cannot_drive_a_sealed_desktop(hub, http, desktop, tmp_path):
    pid = desktop.pairing_id
    controller = await enrolled_controller(hub, desktop, tmp_path / "controller")
    seal(desktop)
    created = await controller.send("create_session", payload={"title": "sealed"})
    assert (created["result"] or {}).get("status") == "completed", created
    session = created["result"]["session"]["id"]
    other = (await controller.send("create_session", payload={"title": "other"}))["result"]
    other_session = other["session"]["id"]
    forged_text = "FORGED-PROMPT-never-run"

    # Unsigned, whatever the kind: prompt, permission, question, abort, revoke.
    unsigned = [
        ("prompt", {"text": forged_text}),
        ("permission.respond", {"permissionId": "per_x", "allowed": True}),
        ("question.reply", {"requestId": "que_x", "answers": [["yes"]]}),
        ("question.reject", {"requestId": "que_x"}),
        ("abort", None),
    ]
    for kind, payload in unsigned:
        row = await _forge(hub, pid, {"kind": kind, "sessionId": session, "payload": payload})
        assert _refusal(row) == "sealed.unsigned", kind

    # Signed by the attacker's own key: unknown; under the controller's id: bad signature.
    attacker = ControllerKeys.generate("attacker")
    desktop_key = controller.link.desktop_key
    assert desktop_key is not None

    def attacker_signed(controller_id: str | None = None) -> dict:
        prompt = {"text": forged_text}
        return _signed_by(attacker, pid, desktop_key, "prompt", session, prompt, controller_id)

    assert _refusal(await _forge(hub, pid, attacker_signed())) == "sealed.unknown_controller"
    impersonated = attacker_signed(controller.keys.controller_id)
    assert _refusal(await _forge(hub, pid, impersonated)) == "sealed.bad_signature"

    # Expired: signed long ago (held back by the hub until it lapsed).
    stale = controller.signed_body(
        "prompt", session, {"text": forged_text}, issued_at=time.time() - 1000, lifetime=300
    )
    assert _refusal(await _forge(hub, pid, stale)) == "sealed.expired"
    # Issued ahead of the Desktop's clock (a controller's clock, not the hub's doing).
    early = controller.signed_body(
        "prompt", session, {"text": forged_text}, issued_at=time.time() + 600
    )
    assert _refusal(await _forge(hub, pid, early)) == "sealed.not_yet_valid"
    # Signed for a payload sealed to another key (a Desktop key the hub slipped in).
    real_link = controller.link
    controller.link = dataclasses.replace(
        real_link, desktop_key=DesktopSealingKey.generate().public
    )
    misdirected = controller.signed_body("prompt", session, {"text": forged_text})
    controller.link = real_link
    assert _refusal(await _forge(hub, pid, misdirected)) == "sealed.undecryptable"

    # Replayed: a command that ran, sent again under a new id.
    ran = controller.signed_body("prompt", session, {"text": "a real prompt"})
    done = await controller.submit_body(ran)
    assert done["result"]["status"] == "queued", done
    again = {**ran, "id": "cmdreplay" + str(time.time_ns())}
    assert _refusal(await _forge(hub, pid, again)) == "sealed.replayed"

    # Reordered: the later sequence first; the earlier one is then refused.
    first = controller.signed_body("status", None, None)
    second = controller.signed_body("status", None, None)
    assert (await controller.submit_body(second))["result"]["status"] == "completed"
    assert _refusal(await _forge(hub, pid, first)) == "sealed.replayed"

    # Wrongly bound: a real signed command delivered for another session or kind.
    for change in ({"sessionId": other_session}, {"kind": "abort"}):
        held = controller.signed_body("prompt", session, {"text": forged_text})
        assert _refusal(await _forge(hub, pid, {**held, **change})) == "sealed.wrong_binding"

    # Another payload under a real signature (anyone can seal to the Desktop's key).
    held = controller.signed_body("prompt", session, {"text": "what the controller said"})
    swapped = attacker_signed()["signed"]["sealedPayload"]
    held["signed"] = {**held["signed"], "sealedPayload": swapped}
    assert _refusal(await _forge(hub, pid, held)) == "sealed.payload_mismatch"

    # Straight onto the Desktop's command subject with the hub's own connection.
    pushed = DeviceCommand(
        id="cmdpushed" + str(time.time_ns()),
        kind="prompt",
        pairing_id=pid,
        workspace_id="local",
        session_id=session,
        payload={"text": forged_text},
        sequence=100_000,
        created_at=datetime.now(UTC),
        lease=Lease(
            leased_by="attacker",
            lease_token="x" * 32,
            lease_expires_at=datetime.now(UTC) + timedelta(seconds=30),
        ),
    )
    source = Source(principal_kind=PrincipalKind.HUB, principal_id="hub")
    await hub.started_nc().publish(
        subjects.DEVICE_COMMAND.build(tenant=TENANT, device_id=pid),
        Envelope.wrap(pushed, source=source, tenant=TENANT).encode(),
    )
    local = DesktopStore(desktop.agent.store.directory)

    def refused_locally() -> set[str]:
        return {
            line.get("code")
            for line in local.read_audit()
            if line["action"] == "command.refused" and line.get("commandId") == pushed.id
        }

    assert await eventually(refused_locally, 10) == {"sealed.unsigned"}

    # Policy: the hub may not loosen it (nor tighten it: it is the Desktop's).
    before = desktop.agent.state.policy
    response = await http.patch(
        f"/api/v1/tenants/{TENANT}/pairings/{pid}",
        json={"policy": {"exposeLocalPaths": True, "allowRemoteAttachments": True}},
    )
    assert response.status_code == 200, response.text
    revision = response.json()["revision"]
    await eventually(lambda: desktop.agent.state.revision >= revision, 10)
    assert desktop.agent.state.policy == before
    assert "pairing.update_refused" in {line["action"] for line in local.read_audit()}

    # An event written into JetStream by the hub comes out in clear, so it says so.
    forged_id = "evforged" + str(time.time_ns())
    event = DeviceEvent(
        id=forged_id,
        pairing_id=pid,
        type="session.event",
        workspace_id="local",
        session_id=session,
        occurred_at=datetime.now(UTC),
        payload={"type": "session.idle", "properties": {"sessionID": session}},
    )
    as_desktop = Source(principal_kind=PrincipalKind.DESKTOP, principal_id=pid)
    await (
        hub.started_nc()
        .jetstream()
        .publish(
            subjects.DEVICE_EVENT.build(tenant=TENANT, device_id=pid, event_kind="session"),
            Envelope.wrap(event, source=as_desktop, tenant=TENANT).encode(),
            headers={"Nats-Msg-Id": forged_id},
        )
    )

    async def forged_event_seen() -> dict | None:
        return next((e for e in await controller.events() if e["id"] == forged_id), None)

    seen = await eventually(forged_event_seen, 10, 0.1, "the forged event in the log")
    assert seen["sealed"] is False
    session_events = [e for e in await controller.events() if e["sessionId"] == session]
    assert [e for e in session_events if e["id"] != forged_id and not e["sealed"]] == []

    # An honest client's mistakes are a 422 at the hub (not a security check).
    base = f"/api/v1/tenants/{TENANT}/pairings/{pid}/commands"
    good = controller.signed_body("prompt", session, {"text": "x"})
    for wrong, message in (
        ({**good, "payload": {"text": "x"}}, "carries its payload sealed"),
        ({**good, "id": "cmdother"}, "is the one it is signed for"),
        ({**good, "sessionId": other_session}, "must be the ones signed"),
    ):
        response = await http.post(base, json=wrong)
        assert response.status_code == 422 and message in response.text, response.text

    # Every refusal is audited on the Desktop with its code, and nothing forged ran.
    codes = {line.get("code") for line in local.read_audit() if line["action"] == "command.refused"}
    assert codes >= {
        "sealed.unsigned",
        "sealed.unknown_controller",
        "sealed.bad_signature",
        "sealed.expired",
        "sealed.replayed",
        "sealed.wrong_binding",
        "sealed.payload_mismatch",
        "sealed.not_yet_valid",
        "sealed.undecryptable",
    }
    messages = json.dumps(await desktop.agent.opencode.messages(session))
    assert "a real prompt" in messages and forged_text not in messages
    assert "what the controller said" not in messages
    await controller.aclose()


# A command written straight into the hub's table, around its API and its code: the
# next sequence taken by hand, leased already and lapsed, so the hub's own reaper
# pushes it to the Desktop as it would any command it had accepted.
WRITE_COMMAND_ROW = """
    WITH seq AS (
        UPDATE pairings SET next_command_sequence = next_command_sequence + 1
        WHERE tenant = $1 AND pairing_id = $2 RETURNING next_command_sequence)
    INSERT INTO pairing_commands (tenant, command_id, pairing_id, sequence, kind,
        workspace_id, session_id, payload, body_hash, signed, state, lease_token,
        lease_expires_at, pushed_at)
    SELECT $1, $3, $2, next_command_sequence, $4, $5, $6, $7, '\\x00'::bytea, $8, 'leased',
        'forged-lease-token', now() - interval '1 second', now() - interval '1 second'
    FROM seq"""


async def _written_into_postgres(hub, pid: str, body: dict, wait: float = 20.0) -> dict:
    """Write `body` as a row of `pairing_commands` with SQL (not `submit`, not HTTP)
    and return the row once the Desktop's answer made it final."""
    command_id = body.get("id") or "cmdsql" + str(time.time_ns())
    await hub.pool.execute(
        WRITE_COMMAND_ROW,
        TENANT,
        pid,
        command_id,
        body["kind"],
        body.get("workspaceId", "local"),
        body.get("sessionId"),
        body.get("payload"),
        body.get("signed"),
    )
    row = await hub.commands.wait_final(TENANT, pid, command_id, wait)
    assert row["state"] == "done", row
    return row


async def test_commands_bound_elsewhere_or_written_around_the_hub_are_refused(
    hub, desktop, tmp_path
):
    """Validly signed by the enrolled controller, but for another tenant, pairing,
    workspace or session: `sealed.wrong_binding`, naming what. And commands the
    attacker writes itself, as rows of the hub's PostgreSQL table (pushed by the hub's
    own reaper) or published on the Desktop's command subject with the hub's own
    connection, are refused with their codes and never run."""
    pid = desktop.pairing_id
    controller = await enrolled_controller(hub, desktop, tmp_path / "controller")
    seal(desktop)
    created = await controller.send("create_session", payload={"title": "bound"})
    session = created["result"]["session"]["id"]
    other_session = (await controller.send("create_session", payload={"title": "o"}))["result"][
        "session"
    ]["id"]
    marker = "WRONGLY-BOUND-never-run"
    desktop_key = controller.link.desktop_key
    assert desktop_key is not None

    def signed_for(**claims) -> dict:
        """Signed by the enrolled controller for `claims`, delivered to this pairing's
        `local` workspace and `session`."""
        bound = {
            "tenant": TENANT,
            "pairing_id": pid,
            "workspace_id": "local",
            "session_id": session,
            **claims,
        }
        signed = controller.keys.sign(
            command_id="cmdbound" + str(time.time_ns()),
            sequence=controller.store.take_sequence(pid),
            kind="prompt",
            payload={"text": marker},
            desktop_key=desktop_key,
            **bound,
        )
        return {
            "id": signed.claims.command_id,
            "kind": "prompt",
            "sessionId": session,
            "signed": signed.model_dump(mode="json", by_alias=True),
        }

    for claims, named in (
        ({"tenant": "other-tenant"}, "tenant"),
        ({"pairing_id": "other-pairing"}, "pairing"),
        ({"workspace_id": "other-workspace"}, "workspace"),
        ({"session_id": other_session}, "session"),
    ):
        row = await _forge(hub, pid, signed_for(**claims))
        assert _refusal(row) == "sealed.wrong_binding", claims
        assert row["result"]["message"] == f"signed for another {named}", row["result"]

    # Rows written into PostgreSQL by hand: unsigned, signed by the attacker under the
    # controller's id, and a real signed command that ran, copied under a new id.
    attacker = ControllerKeys.generate("attacker")
    impersonated = _signed_by(
        attacker,
        pid,
        desktop_key,
        "prompt",
        session,
        {"text": marker},
        controller.keys.controller_id,
    )
    ran = controller.signed_body("prompt", session, {"text": "the real prompt"})
    assert (await controller.submit_body(ran))["result"]["status"] == "queued"
    for body, code in (
        ({"kind": "prompt", "sessionId": session, "payload": {"text": marker}}, "sealed.unsigned"),
        (
            {"kind": "permission.respond", "payload": {"permissionId": "per_x", "allowed": True}},
            "sealed.unsigned",
        ),
        (
            {"kind": "policy.set", "payload": {"policy": {"exposeLocalPaths": True}}},
            "sealed.unsigned",
        ),
        (impersonated, "sealed.bad_signature"),
        ({**ran, "id": "cmdsqlreplay" + str(time.time_ns())}, "sealed.replayed"),
    ):
        row = await _written_into_postgres(hub, pid, body)
        assert _refusal(row) == code, (body["kind"], row["result"])

    # Published on the Desktop's command subject with the hub's own connection: signed
    # by the attacker, and a real signed command re-addressed to another session.
    nc = hub.started_nc()
    source = Source(principal_kind=PrincipalKind.HUB, principal_id="hub")
    held = signed_for()
    pushes = {
        "sealed.unknown_controller": _signed_by(
            attacker, pid, desktop_key, "prompt", session, {"text": marker}
        ),
        "sealed.wrong_binding": {**held, "sessionId": other_session},
    }
    ids = {}
    for code, body in pushes.items():
        pushed = DeviceCommand(
            id=body["id"],
            kind="prompt",
            pairing_id=pid,
            workspace_id="local",
            session_id=body["sessionId"],
            signed=body["signed"],
            sequence=200_000 + len(ids),
            created_at=datetime.now(UTC),
            lease=Lease(
                leased_by="attacker",
                lease_token="y" * 32,
                lease_expires_at=datetime.now(UTC) + timedelta(seconds=30),
            ),
        )
        ids[pushed.id] = code
        await nc.publish(
            subjects.DEVICE_COMMAND.build(tenant=TENANT, device_id=pid),
            Envelope.wrap(pushed, source=source, tenant=TENANT).encode(),
        )
    local = DesktopStore(desktop.agent.store.directory)

    def refused_pushes() -> dict[str, str]:
        return {
            line["commandId"]: line.get("code")
            for line in local.read_audit()
            if line["action"] == "command.refused" and line.get("commandId") in ids
        }

    assert await eventually(lambda: refused_pushes() == ids and ids, 10) == ids
    # No stream holds the command subject: JetStream is no way in either.
    with pytest.raises(NotFoundError):
        await nc.jetstream().find_stream_name_by_subject(
            subjects.DEVICE_COMMAND.build(tenant=TENANT, device_id=pid)
        )

    messages = json.dumps(await desktop.agent.opencode.messages(session))
    assert "the real prompt" in messages and marker not in messages
    assert marker not in json.dumps(await desktop.agent.opencode.messages(other_session))
    assert desktop.agent.state.policy.expose_local_paths is False
    await controller.aclose()


async def test_a_removed_controller_cannot_open_what_follows(hub, http, desktop, tmp_path):
    kept = await enrolled_controller(hub, desktop, tmp_path / "kept", "kept")
    assert (await get_pairing(http, desktop.pairing_id))["trust"] == "hub"
    seal(desktop)

    async def reported_sealed() -> bool:  # in the next heartbeat, for admins and channels
        return (await get_pairing(http, desktop.pairing_id))["trust"] == "sealed"

    await eventually(reported_sealed, 10, 0.1, "the pairing to show trust sealed")
    # Enrolment asks through the hub unsigned, also once sealed; a person approves.
    removed = await enrolled_controller(hub, desktop, tmp_path / "removed", "removed")
    # A controller that pinned another Desktop fingerprint refuses the answer (the hub
    # could have put its own key there).
    store = ControllerStore(tmp_path / "wary")
    wary = RemoteClient(
        store,
        PairingLink(desktop.pairing_id, TENANT, hub.http_url, None, None),
        hub.test_admin_token,
        keys=store.create_keys("wary"),
    )
    with pytest.raises(RemoteError, match="do not use this pairing"):
        await wary.request_enrolment(expect_desktop="AAAA-BBBB-CCCC-DDDD")
    await wary.aclose()
    session = (await kept.send("create_session", payload={"title": "t"}))["result"]["session"]

    async def of_session() -> list[dict]:
        raw = await kept._http.get(kept._events, params={"after": 0, "limit": 500})
        return [i for i in raw.json()["items"] if i["sessionId"] == session["id"]]

    # What the hub holds of the session is ciphertext; both controllers open it.
    ours = await eventually(of_session, 10, 0.1, "the session's events")
    assert all("sealed" in item["payload"] for item in ours)
    before = await kept.events()
    seen_by_removed = {e["id"]: e for e in await removed.events()}
    assert all(seen_by_removed[i["id"]]["payload"] is not None for i in ours), "both open these"

    from edges.desktop._sealed import remove

    remove(DesktopStore(desktop.agent.store.directory), removed.keys.controller_id)
    last = before[-1]["sequence"]
    done = await kept.send("prompt", session["id"], {"text": "after the removal"})
    assert done["result"]["status"] == "queued", done

    async def replied() -> list[dict]:
        after = await kept.events(last)
        return after if any("reply to: after the removal" in json.dumps(e) for e in after) else []

    after = await eventually(replied, 20, 0.1, "the reply, readable by the kept controller")
    assert all(e["payload"] is not None for e in after)
    for item in await removed.events(last):
        assert item["payload"] is None and "no content key" in item["sealedError"]
    # What it could read before, it still can (it held that key then).
    assert all(
        e["payload"] is not None
        for e in await removed.events(0)
        if e["id"] in {i["id"] for i in ours}
    )
    with pytest.raises(Exception, match="no content key"):
        removed.open_view(await kept._submit(kept.signed_body("status", None, None)))

    # A damaged trust file fails closed: sealed, to no controller.
    (desktop.agent.store.directory / "sealed.json").write_text("{not json")
    row = await _forge(hub, desktop.pairing_id, {"kind": "status"})
    assert _refusal(row) == "sealed.unsigned"
    refused = await kept.send("status")
    assert refused["result"]["code"] == "sealed.unknown_controller", refused
    await kept.aclose()
    await removed.aclose()


async def test_a_one_time_invite_enrols_once_and_only_with_its_secret(hub, desktop, tmp_path):
    """`cowork desktop controllers invite` makes a link; `cowork remote enrol LINK`
    enrols at once, once. Reuse, expiry, a guessed secret, an unknown invite, and the
    hub moving a real invite to keys of its own are refused with their codes."""
    pid, directory = desktop.pairing_id, desktop.agent.store.directory
    seal(desktop)  # enrolment needs no signature, sealed or not
    env = {"COWORK_ADMIN_TOKEN": hub.test_admin_token, "COWORK_HUB_HTTP": hub.http_url}
    code, out, err = await cowork(
        "desktop", "controllers", "invite", "--ttl", "10m", "--state-dir", str(directory), env=env
    )
    assert code == 0, err
    link_text = next(line for line in out.splitlines() if line.startswith("cowork+enrol://"))
    assert "\u2580" in out or "\u2584" in out or "\u2588" in out, "a terminal QR code"
    invite = InviteLink.parse(link_text)
    assert invite.hub_url == hub.http_url and invite.pairing_id == pid
    stored = (directory / "controller-invites.json").read_text()
    assert invite.invite_id in stored and invite.secret not in stored, "only a hash is kept"

    first, second = tmp_path / "first", tmp_path / "second"
    made = ControllerStore(first)  # as `cowork remote init` would
    made.create_keys("phone")
    made.close()
    code, out, err = await cowork("remote", "enrol", link_text, "--state-dir", str(first), env=env)
    assert code == 0, err
    assert desktop.agent.guard.key.fingerprint in out
    store = ControllerStore(first)
    client = RemoteClient(store, store.link(pid), hub.test_admin_token)
    status = await client.send("status")  # enrolled for real: its signed command runs
    assert status["sealed"] is True and status["result"]["status"] == "completed", status
    await client.aclose()

    # The same link again, from another controller: used.
    other = ControllerStore(second)
    other.create_keys("x")
    async with RemoteClient(
        other, PairingLink(pid, TENANT, hub.http_url, None, None), env["COWORK_ADMIN_TOKEN"]
    ) as reuse:
        with pytest.raises(RemoteError) as refused_reuse:
            await reuse.enrol_with_invite(invite)
    assert refused_reuse.value.code == "invite.used"

    local = DesktopStore(directory)

    async def presented(link: InviteLink, keys: ControllerKeys, sealed_secret=None) -> str:
        public = keys.public
        proof = link.present(public).model_dump(mode="json", by_alias=True)
        if sealed_secret is not None:
            proof["sealedSecret"] = sealed_secret
        payload = {
            "label": public.label,
            "signingKey": public.signing_key,
            "encryptionKey": public.encryption_key,
            "invite": proof,
        }
        row = await _forge(hub, pid, {"kind": "controller.enrol", "payload": payload})
        return _refusal(row)

    attacker = ControllerKeys.generate("attacker")
    expired = create_invite(local, 60, hub.http_url, now=time.time() - 120)
    assert await presented(expired, ControllerKeys.generate("late")) == "invite.expired"
    fresh = create_invite(local, 600, hub.http_url)
    guessed = InviteLink(TENANT, pid, fresh.invite_id, b64url(os.urandom(32)), fresh.desktop_key)
    assert await presented(guessed, attacker) == "invite.invalid"
    # The hub saw a real controller present `fresh`: it cannot bind that to its keys.
    honest = fresh.present(ControllerKeys.generate("honest").public).sealed_secret
    assert await presented(fresh, attacker, sealed_secret=honest) == "invite.invalid"
    unknown = InviteLink(TENANT, pid, "invnothere", fresh.secret, fresh.desktop_key)
    assert await presented(unknown, attacker) == "invite.unknown"

    enrolled = set(load_trust(local).controllers)
    assert attacker.controller_id not in enrolled and len(enrolled) == 1
    refused = {
        line["code"] for line in local.read_audit() if line["action"] == "controller.invite_refused"
    }
    assert refused == {"invite.used", "invite.expired", "invite.invalid", "invite.unknown"}
    # The refusals did not spend `fresh`: its rightful holder enrols with it.
    late = ControllerStore(tmp_path / "late")
    link = PairingLink(pid, TENANT, hub.http_url, None, None)
    async with RemoteClient(late, link, hub.test_admin_token, keys=late.create_keys("late")) as c:
        await c.enrol_with_invite(fresh)
        assert (await c.send("status"))["sealed"] is True
    # `cowork desktop controllers list` shows each invite's state.
    states = {i["id"]: i["state"] for i in trust_summary(local)["invites"]}
    assert states == {
        invite.invite_id: "used",
        expired.invite_id: "expired",
        fresh.invite_id: "used",
    }


async def test_policy_changes_only_by_a_signed_controller_command(hub, http, desktop, tmp_path):
    pid = desktop.pairing_id
    controller = await enrolled_controller(hub, desktop, tmp_path / "controller")
    seal(desktop)
    local = DesktopStore(desktop.agent.store.directory)
    before = desktop.agent.state
    loosen = {"policy": {"exposeLocalPaths": True, "allowRemoteAttachments": True}}

    # Unsigned (the hub writing the row itself), or signed by a key that is not enrolled.
    assert _refusal(await _forge(hub, pid, {"kind": "policy.set", "payload": loosen})) == (
        "sealed.unsigned"
    )
    attacker = ControllerKeys.generate("attacker")
    key = desktop.agent.guard.key.public
    body = _signed_by(attacker, pid, key, "policy.set", None, loosen)
    assert _refusal(await _forge(hub, pid, body)) == "sealed.unknown_controller"
    # An honest client is told at once that policy.set is a signed command.
    response = await http.post(
        f"/api/v1/tenants/{TENANT}/pairings/{pid}/commands",
        json={"kind": "policy.set", "payload": loosen},
    )
    assert response.status_code == 422 and "signed command" in response.text, response.text

    # A pairing.state pushed straight onto the Desktop's subject with the hub's connection.
    forged = PairingState(
        pairing_id=pid,
        revision=before.revision + 100,
        enabled=True,
        allowed_workspace_ids=["local", "elsewhere"],
        allowed_session_ids=None,
        policy=PairingPolicy(expose_local_paths=True, allow_remote_attachments=True),
    )
    source = Source(principal_kind=PrincipalKind.HUB, principal_id="hub")
    await hub.started_nc().publish(
        subjects.DEVICE_COMMAND.build(tenant=TENANT, device_id=pid),
        Envelope.wrap(forged, source=source, tenant=TENANT).encode(),
    )
    await eventually(lambda: desktop.agent.state.revision == forged.revision, 10)
    assert desktop.agent.state.policy == before.policy
    assert desktop.agent.state.allowed_workspace_ids == before.allowed_workspace_ids
    assert any(
        line["action"] == "pairing.update_refused" and line.get("revision") == forged.revision
        for line in local.read_audit()
    )

    # The enrolled controller's signed policy.set applies, persists, and is enforced.
    done = await controller.send("policy.set", payload={"policy": {"allowRemotePrompts": False}})
    assert done["sealed"] is True and done["result"]["status"] == "completed", done
    assert done["result"]["data"]["policy"]["allowRemotePrompts"] is False
    assert desktop.agent.state.policy == before.policy.model_copy(
        update={"allow_remote_prompts": False}
    ), "only the field given changed"
    assert local.load_pairing().state["policy"]["allowRemotePrompts"] is False
    blocked = await controller.send("create_session", payload={"title": "no"})
    assert blocked["result"]["status"] == "blocked_by_policy", blocked
    assert "remote prompts are disabled" in blocked["result"]["message"]
    audited = [line for line in local.read_audit() if line["action"] == "pairing.policy_set"]
    assert audited and audited[-1]["controllerId"] == controller.keys.controller_id

    # On a hub-trust pairing the hub's PATCH owns the policy: a signed policy.set is refused.
    set_trust(local, "hub")
    refused = await controller.send("policy.set", payload={"policy": {"allowRemotePrompts": True}})
    assert refused["result"]["code"] == "policy.not_sealed", refused
    assert desktop.agent.state.policy.allow_remote_prompts is False
    await controller.aclose()


def test_invites_made_at_once_by_several_processes_are_all_kept(tmp_path):
    """`controllers invite` (the CLI) and an enrolment (the agent) rewrite the invites
    file from separate processes: interleaved, one must never erase the other's."""
    import threading

    from edges.desktop._sealed import load_invites, sealing_key
    from edges.desktop._store import PairingFile

    store = DesktopStore(tmp_path / "desk")
    store.save_pairing(
        PairingFile(TENANT, "pairing-1", "desk", ["nats://127.0.0.1:4222"], "desk", "now")
    )
    sealing_key(store)  # made once, as the agent does at its start
    start = threading.Barrier(12)
    made: list[str] = []

    def make() -> None:
        start.wait()
        made.append(create_invite(DesktopStore(tmp_path / "desk"), 600).invite_id)

    threads = [threading.Thread(target=make) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(load_invites(store)) == sorted(made) and len(made) == 12
