"""Desktop pairing: the admin REST API and code redemption over the bootstrap bus.

One hub (operator-mode NATS, real PostgreSQL) serves the whole module; each
test makes its own pairings. Redemption goes through `edges.desktop._agent.pair`,
exactly as `cowork desktop pair` does. The brute-force counter lives in the
module's database, so it is cleared before every test.
"""

from __future__ import annotations

import json
import re
import secrets
import stat
import statistics
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import nats
import nats.errors
import pytest
from desktopkit import TENANT, api, create_pairing, eventually, get_pairing, redeem
from hubkit import client

from edges.common._credentials import EdgeCredentials, new_user_seed
from edges.desktop._agent import PairingFailed, pair
from edges.desktop._store import DesktopStore
from hub.bus import LOCKOUT, MAX_FAILURES, BootstrapLockout, request_source
from hub.core import Refusal, flushed
from hub.desktop import PairingRedemption
from hub.desktop._pairing import new_code, normalize_code
from schemas import PairingRedeemRequest, subjects
from schemas._bootstrap import (
    BOOTSTRAP_USER_JWT,
    BOOTSTRAP_USER_SEED,
    ReplyKey,
    SealError,
    seal,
)

pytestmark = pytest.mark.timeout(120)

BASE = f"/api/v1/tenants/{TENANT}/pairings"
SYMBOL = "[2-9A-HJ-NP-Z]"  # the code alphabet: no 0/O, no 1/I
CODE_RE = re.compile(rf"^{SYMBOL}{{4}}-{SYMBOL}{{4}}-{SYMBOL}{{2}}$")
SECRET_KEY_WORDS = ("hash", "secret", "jwt", "seed", "token", "password", "creds")


@pytest.fixture(autouse=True)
async def _fresh_brute_force_counter(hub):
    """Failed codes of one test must not lock the next one out (all come from 127.0.0.1)."""
    await hub.pool.execute("DELETE FROM bootstrap_failures")
    yield
    await hub.pool.execute("DELETE FROM bootstrap_failures")


# --- helpers ------------------------------------------------------------------------------
def _keys(value, prefix: str = "") -> list[str]:
    """Every key of a JSON document, recursively."""
    out: list[str] = []
    if isinstance(value, dict):
        for key, inner in value.items():
            out.append(key)
            out += _keys(inner)
    elif isinstance(value, list):
        for inner in value:
            out += _keys(inner)
    return out


def _assert_no_secret(document: dict, *secrets_: str) -> None:
    text = json.dumps(document)
    for secret in secrets_:
        assert secret not in text, f"{secret[:12]}... leaked into {text[:300]}"
    for key in _keys(document):
        lowered = key.lower()
        assert lowered != "code", f"the code field is exposed: {key}"
        assert not any(word in lowered for word in SECRET_KEY_WORDS), f"secret-ish key {key!r}"


def _assert_json_error(response, *statuses: int) -> dict:
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] and body["error"]["message"], body
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body["error"]


async def _audit_actions(hub, pairing_id: str) -> list[str]:
    rows = await hub.pool.fetch(
        "SELECT action FROM audit_log WHERE tenant = $1 AND target_id = $2 ORDER BY id",
        TENANT,
        pairing_id,
    )
    return [r["action"] for r in rows]


async def _pair_fails(code: str, url: str, state_dir) -> PairingFailed:
    with pytest.raises(PairingFailed) as caught:
        await pair(code, [url], DesktopStore(state_dir), device_name="intruder", timeout=5)
    return caught.value


def _wrong_code(right: str) -> str:
    while True:
        code = new_code()
        if normalize_code(code) != normalize_code(right):
            return code


# --- create / read ------------------------------------------------------------------------
@pytest.mark.bench  # a CPU ratio: `make bench`, not the timing-free `make test`
async def test_creating_a_pairing_costs_about_what_registering_a_gateway_does(hub, http):
    """A fleet is paired through this API by the thousand, and each answer carries a
    QR code of its pairing link. segno drew and scored all 8 of its mask patterns,
    about 11 ms of CPU, more than the rest of the request: 10,000 pairings blocked
    the hub's event loop for about 2 minutes (docs/performance.md, "Fleet"). The
    hub and this client share this process, so the CPU measured is both; the same
    kind of request without a QR code, registering a Gateway (a row, an audit
    record, a secret in the answer), is the same-run baseline. Measured on the
    2-vCPU VM at load average 15: 1.8-2.1x with one mask, 2.9-3.5x with the 8; on
    the quiet VM later (a longer link, cheaper registrations), 2.8-3.0x with one
    mask and segno's SVG writer, 1.5-2.6x (median 1.9-2.1) with the SVG of
    hub/desktop/_qr.py."""
    base = f"/api/v1/tenants/{TENANT}"
    gateway = {"displayName": "g", "kind": "edge_worker", "trustModel": "self_hosted_same_operator"}

    async def cpu_ms(path: str, body: dict, count: int = 30) -> float:
        started = time.process_time()
        for _ in range(count):
            response = await http.post(path, json=body)
            assert response.status_code == 201, response.text
        return 1000 * (time.process_time() - started) / count

    await cpu_ms(BASE, {"label": "warm-up"}, 2)  # first-use imports, prepared statements
    await cpu_ms(f"{base}/gateway-registrations", gateway, 2)
    ratios = []
    for _ in range(3):
        pairing = await cpu_ms(BASE, {"label": "fleet"})
        registration = await cpu_ms(f"{base}/gateway-registrations", gateway)
        ratios.append(pairing / registration)
        print(f"CPU a request: pairing {pairing:.2f} ms, Gateway {registration:.2f} ms")
    assert statistics.median(ratios) < 2.5, ratios


async def test_create_returns_a_typeable_one_time_code(hub, http):
    before = datetime.now(UTC)
    response = await http.post(BASE, json={"label": "Ada's laptop"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {
        "pairingId",
        "code",
        "expiresAt",
        "hub",
        "pairingLink",
        "pairingQrSvg",
        "command",
    }
    assert CODE_RE.fullmatch(body["code"]), body["code"]
    assert body["hub"] == hub.settings.edge_nats_urls
    assert body["command"] == f"cowork desktop pair {body['code']} --hub {body['hub'][0]}"
    assert body["pairingLink"].startswith(f"{hub.http_url}/console/pair#code={body['code']}&")
    assert body["pairingQrSvg"].startswith("data:image/svg+xml")
    expires = datetime.fromisoformat(body["expiresAt"])
    assert expires.tzinfo is not None
    assert timedelta(seconds=570) <= expires - before <= timedelta(seconds=630), expires

    view = await get_pairing(http, body["pairingId"])
    assert view["id"] == body["pairingId"] and view["label"] == "Ada's laptop"
    assert view["status"] == "pending" and view["redeemed"] is False
    assert view["enabled"] is True and view["online"] is False
    assert view["allowedWorkspaceIds"] == ["local"] and view["allowedSessionIds"] is None
    assert view["policy"] == {
        "allowRemotePrompts": True,
        "allowRemoteAbort": True,
        "remoteApprovals": "local_confirmation",
        "remoteQuestions": "local_confirmation",
        "exposeArtifactBodies": False,
        "exposeLocalPaths": False,
        "exposeLocalMcpDetails": False,
        "allowRemoteAttachments": False,
    }
    assert datetime.fromisoformat(view["codeExpiresAt"]) == expires
    assert "pairing.created" in await _audit_actions(hub, body["pairingId"])

    # The code is stored only as an HMAC: nothing in the row equals the code.
    row = await hub.pool.fetchrow("SELECT * FROM pairings WHERE pairing_id = $1", body["pairingId"])
    stored = json.dumps({k: v for k, v in dict(row).items()}, default=str)
    assert body["code"] not in stored and normalize_code(body["code"]) not in stored
    assert isinstance(row["code_hash"], bytes) and len(row["code_hash"]) == 32


async def test_codes_differ_and_ttl_is_bounded(http):
    first = await create_pairing(http)
    second = await create_pairing(http, codeTtlSeconds=120)
    assert first["code"] != second["code"]
    short = datetime.fromisoformat(second["expiresAt"]) - datetime.now(UTC)
    assert timedelta(seconds=100) <= short <= timedelta(seconds=125), short
    for ttl in (59, 3601):
        error = _assert_json_error(
            await http.post(BASE, json={"label": "x", "codeTtlSeconds": ttl}), 422
        )
        assert "codeTtlSeconds" in error["message"], error


async def test_get_and_list_never_show_the_code_or_a_secret(hub, http, operator_nats_url, tmp_path):
    pending = await create_pairing(http, label="pending one")
    redeemed, store = await redeem(http, operator_nats_url, tmp_path / "d", label="paired one")
    creds = store.creds_path.read_text()
    user_jwt = EdgeCredentials.from_creds_file(store.creds_path).user_jwt
    seed = re.search(r"(SU[A-Z2-7]{56})", creds)[1]
    row = await hub.pool.fetchrow(
        "SELECT code_hash FROM pairings WHERE pairing_id = $1", pending["pairingId"]
    )
    hex_hash = row["code_hash"].hex()

    listed = await http.get(BASE)
    assert listed.status_code == 200, listed.text
    items = listed.json()["items"]
    assert {pending["pairingId"], redeemed["pairingId"]} <= {i["id"] for i in items}
    documents = [
        listed.json(),
        await get_pairing(http, pending["pairingId"]),
        await get_pairing(http, redeemed["pairingId"]),
    ]
    for document in documents:
        _assert_no_secret(
            document,
            pending["code"],
            normalize_code(pending["code"]),
            redeemed["code"],
            normalize_code(redeemed["code"]),
            user_jwt,
            seed,
            hex_hash,
        )
    assert (await http.get(BASE, params={"limit": 1})).json()["items"].__len__() == 1


async def test_unknown_pairing_is_a_json_404(http):
    error = _assert_json_error(await http.get(f"{BASE}/no_such_pairing"), 404)
    assert error["code"] == "pairing.not_found"
    for method, path in (("PATCH", ""), ("POST", "/revoke")):
        response = await http.request(
            method,
            f"{BASE}/no_such_pairing{path}",
            json={"label": "x"} if method == "PATCH" else None,
        )
        assert _assert_json_error(response, 404)["code"] == "pairing.not_found"


@pytest.mark.parametrize(
    "body, where",
    [
        ({}, "label"),
        ({"label": ""}, "label"),
        ({"label": "x" * 513}, "label"),
        ({"label": "ok", "policy": {"remoteApprovals": "sometimes"}}, "remoteApprovals"),
        ({"label": "ok", "policy": {"remoteQuestions": True}}, "remoteQuestions"),
        ({"label": "ok", "policy": {"noSuchSwitch": True}}, "noSuchSwitch"),
        ({"label": "ok", "allowedWorkspaceIds": ["has space"]}, "allowedWorkspaceIds"),
        ({"label": "ok", "allowedWorkspaceIds": ["a.b"]}, "allowedWorkspaceIds"),
        ({"label": "ok", "allowedSessionIds": ["s"] * 129}, "allowedSessionIds"),
        ({"label": "ok", "allowedSessionIds": ["x" * 257]}, "allowedSessionIds"),
        ({"label": "ok", "unexpected": 1}, "unexpected"),
    ],
)
async def test_invalid_create_bodies_are_explained(http, body, where):
    error = _assert_json_error(await http.post(BASE, json=body), 400, 422)
    assert error["code"] == "invalid_request"
    assert where in error["message"], error


@pytest.mark.parametrize("raw", [b"not json", b"", b"[1, 2]", b'{"label": "x"'])
async def test_malformed_json_is_a_clear_4xx(http, raw):
    response = await http.post(BASE, content=raw, headers={"Content-Type": "application/json"})
    _assert_json_error(response, 400, 422)


async def test_bad_ids_in_the_path_are_refused(http):
    for bad in ("bad.id", "has%20space", "x" * 129):
        response = await http.get(f"{BASE}/{bad}")
        error = _assert_json_error(response, 400, 404)
        assert response.status_code == 400, (bad, error)
        assert "not a valid" in error["message"], error
    response = await http.get("/api/v1/tenants/Not_A_Tenant!/pairings")
    assert _assert_json_error(response, 400)


async def test_the_api_needs_the_admin_token(hub, http):
    created = await create_pairing(http)
    async with client(hub) as anonymous:
        for method, path in (
            ("GET", BASE),
            ("POST", BASE),
            ("GET", f"{BASE}/{created['pairingId']}"),
            ("PATCH", f"{BASE}/{created['pairingId']}"),
            ("POST", f"{BASE}/{created['pairingId']}/revoke"),
            ("POST", f"{BASE}/{created['pairingId']}/commands"),
        ):
            response = await anonymous.request(method, path, json={"label": "x"})
            error = _assert_json_error(response, 401)
            assert error["code"] == "unauthenticated", (method, path, error)
            assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
        wrong = await anonymous.get(BASE, headers={"Authorization": "Bearer not-the-token"})
        assert _assert_json_error(wrong, 401)["code"] == "invalid_token"
        basic = await anonymous.get(BASE, headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
        assert _assert_json_error(basic, 401)["code"] == "unauthenticated"
    # Nothing above changed the pairing.
    assert (await get_pairing(http, created["pairingId"]))["revision"] == 1


# --- change / revoke ----------------------------------------------------------------------
async def test_patch_changes_policy_and_allowlists_and_bumps_revision(hub, http):
    created = await create_pairing(http)
    pid = created["pairingId"]
    before = await get_pairing(http, pid)
    response = await http.patch(
        f"{BASE}/{pid}",
        json={
            "label": "renamed",
            "allowedWorkspaceIds": ["ws-a"],
            "allowedSessionIds": ["ses_1", "ses_2"],
            "policy": {"allowRemoteAttachments": True, "remoteQuestions": "disabled"},
        },
    )
    assert response.status_code == 200, response.text
    after = response.json()
    assert after["revision"] == before["revision"] + 1
    assert after["label"] == "renamed"
    assert after["allowedWorkspaceIds"] == ["local", "ws-a"], "local is always allowed"
    assert after["allowedSessionIds"] == ["ses_1", "ses_2"]
    assert after["policy"]["allowRemoteAttachments"] is True
    assert after["policy"]["remoteQuestions"] == "disabled"
    # Untouched policy keys keep their values.
    assert after["policy"]["remoteApprovals"] == "local_confirmation"
    assert after["policy"]["allowRemotePrompts"] is True
    assert await get_pairing(http, pid) == after
    actions = await _audit_actions(hub, pid)
    assert "pairing.updated" in actions
    assert "pairing.remote_allowed_enabled" not in actions

    # Disable, then enable again: status follows, each one audited and versioned.
    disabled = (await http.patch(f"{BASE}/{pid}", json={"enabled": False})).json()
    assert disabled["enabled"] is False and disabled["status"] == "disabled"
    assert disabled["revision"] == after["revision"] + 1
    enabled = (await http.patch(f"{BASE}/{pid}", json={"enabled": True})).json()
    assert enabled["enabled"] is True and enabled["revision"] == after["revision"] + 2
    actions = await _audit_actions(hub, pid)
    assert "pairing.disabled" in actions and "pairing.enabled" in actions


async def test_raising_a_decision_to_remote_allowed_is_audited(hub, http):
    pid = (await create_pairing(http))["pairingId"]
    response = await http.patch(
        f"{BASE}/{pid}", json={"policy": {"remoteApprovals": "remote_allowed"}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["policy"]["remoteApprovals"] == "remote_allowed"
    rows = await hub.pool.fetch(
        "SELECT actor_kind, actor_id, metadata FROM audit_log WHERE tenant = $1 AND "
        "target_id = $2 AND action = 'pairing.remote_allowed_enabled'",
        TENANT,
        pid,
    )
    assert len(rows) == 1
    assert rows[0]["actor_kind"] == "admin"
    assert rows[0]["metadata"]["decision"] == "remote_approvals"
    assert rows[0]["metadata"]["from"] == "local_confirmation"

    # Setting it again is no raise; raising the other decision is its own row.
    await http.patch(f"{BASE}/{pid}", json={"policy": {"remoteApprovals": "remote_allowed"}})
    await http.patch(f"{BASE}/{pid}", json={"policy": {"remoteQuestions": "remote_allowed"}})
    rows = await hub.pool.fetch(
        "SELECT metadata FROM audit_log WHERE tenant = $1 AND target_id = $2 AND "
        "action = 'pairing.remote_allowed_enabled' ORDER BY id",
        TENANT,
        pid,
    )
    assert [r["metadata"]["decision"] for r in rows] == ["remote_approvals", "remote_questions"]


@pytest.mark.parametrize(
    "body, where",
    [
        ({"policy": {"remoteApprovals": "always"}}, "emote"),
        ({"policy": {"allowRemotePrompts": "yes please"}}, "allowRemotePrompts"),
        ({"allowedWorkspaceIds": ["no/slash"]}, "allowedWorkspaceIds"),
        ({"label": ""}, "label"),
        ({"enabled": "maybe"}, "enabled"),
        ({"status": "revoked"}, "status"),
        ({}, "nothing to change"),
    ],
)
async def test_invalid_patches_are_refused_and_change_nothing(http, body, where):
    pid = (await create_pairing(http))["pairingId"]
    before = await get_pairing(http, pid)
    error = _assert_json_error(await http.patch(f"{BASE}/{pid}", json=body), 400, 422)
    assert where in error["message"], error
    assert await get_pairing(http, pid) == before


async def test_revoke_is_final_and_idempotent(hub, http, operator_nats_url, tmp_path):
    created = await create_pairing(http)
    pid = created["pairingId"]
    first = await http.post(f"{BASE}/{pid}/revoke", json={"reason": "lost it"})
    assert first.status_code == 200, first.text
    first = first.json()
    assert first["status"] == "revoked" and first["enabled"] is False
    assert first["revokedAt"] and first["revokeReason"] == "lost it"

    again = await http.post(f"{BASE}/{pid}/revoke", json={"reason": "second thoughts"})
    assert again.status_code == 200, again.text
    again = again.json()
    for key in ("status", "revokedAt", "revokeReason", "revision", "enabled"):
        assert again[key] == first[key], key
    no_body = await http.post(f"{BASE}/{pid}/revoke")
    assert no_body.status_code == 200, no_body.text
    assert no_body.json()["revision"] == first["revision"]
    audited = await hub.pool.fetch(
        "SELECT reason FROM audit_log WHERE target_id = $1 AND action = 'pairing.revoked'", pid
    )
    assert [r["reason"] for r in audited] == ["lost it"], "revoking again records nothing"

    # A revoked pairing cannot change, and its code is dead.
    patched = await http.patch(f"{BASE}/{pid}", json={"enabled": True})
    assert _assert_json_error(patched, 409)["code"] == "pairing.revoked"
    failed = await _pair_fails(created["code"], operator_nats_url, tmp_path / "d")
    assert failed.code == "pairing.invalid_code"
    assert not (tmp_path / "d" / "desktop.creds").exists()


async def test_revoking_a_redeemed_pairing_twice(hub, http, operator_nats_url, tmp_path):
    created, store = await redeem(http, operator_nats_url, tmp_path / "d")
    pid = created["pairingId"]
    creds = EdgeCredentials.from_creds_file(store.creds_path)

    async def refused() -> bool:
        try:
            nc = await nats.connect(
                operator_nats_url,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=2,
                **creds.connect_options(),
            )
        except (nats.errors.Error, OSError, TimeoutError):
            return True
        await nc.close()
        return False

    assert not await refused(), "the fresh credential connects"
    first = await http.post(f"{BASE}/{pid}/revoke", json={"reason": "stolen"})
    assert first.status_code == 200, first.text
    again = await http.post(f"{BASE}/{pid}/revoke")
    assert again.status_code == 200, again.text
    assert again.json()["revokedAt"] == first.json()["revokedAt"]
    assert again.json()["revokeReason"] == "stolen"
    assert again.json()["revision"] == first.json()["revision"]
    # The Desktop's credential is revoked: it can no longer connect.
    await eventually(refused, 10, 0.2, "the revoked credential to be refused")


# --- redemption ---------------------------------------------------------------------------
async def test_redeem_once_then_the_code_is_spent(hub, http, operator_nats_url, tmp_path):
    created = await create_pairing(http, label="work box")
    state_dir = tmp_path / "desktop"
    state_dir.mkdir(mode=0o755)
    state_dir.chmod(0o755)
    store = DesktopStore(state_dir)
    pairing = await pair(created["code"], [operator_nats_url], store, device_name="ada-mbp")
    assert pairing.pairing_id == created["pairingId"] and pairing.tenant == TENANT
    assert pairing.label == "work box" and pairing.device_name == "ada-mbp"

    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.creds_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((state_dir / "pairing.json").stat().st_mode) == 0o600
    creds = EdgeCredentials.from_creds_file(store.creds_path)
    assert creds.user_jwt.count(".") == 2

    view = await get_pairing(http, created["pairingId"])
    assert view["redeemed"] is True and view["deviceName"] == "ada-mbp"
    assert view["status"] == "paired_offline" and view["codeExpiresAt"] is None
    assert view["revision"] == 2
    assert "pairing.redeemed" in await _audit_actions(hub, created["pairingId"])
    row = await hub.pool.fetchrow(
        "SELECT code_hash, public_key FROM pairings WHERE pairing_id = $1", created["pairingId"]
    )
    assert row["code_hash"] is None and row["public_key"] == creds.public_key

    # The credential works: the Desktop can connect with its own inbox prefix.
    nc = await nats.connect(
        operator_nats_url,
        allow_reconnect=False,
        inbox_prefix=subjects.inbox_prefix(TENANT, "desktop", created["pairingId"]),
        **creds.connect_options(),
    )
    await nc.close()

    failed = await _pair_fails(created["code"], operator_nats_url, tmp_path / "again")
    assert failed.code == "pairing.invalid_code", failed
    assert "already used" in str(failed)
    assert not (tmp_path / "again" / "desktop.creds").exists()
    # The failed second use changed nothing.
    assert (await get_pairing(http, created["pairingId"]))["deviceName"] == "ada-mbp"


async def test_a_state_dir_that_holds_a_pairing_is_not_overwritten(
    http, operator_nats_url, tmp_path
):
    await redeem(http, operator_nats_url, tmp_path / "d")
    other = await create_pairing(http)
    with pytest.raises(PairingFailed) as caught:
        await pair(other["code"], [operator_nats_url], DesktopStore(tmp_path / "d"))
    assert caught.value.code == "pairing.exists"
    # The other code is still good (the refusal happened before any request).
    assert (await get_pairing(http, other["pairingId"]))["redeemed"] is False


async def test_expired_code_is_refused(hub, http, operator_nats_url, tmp_path):
    created = await create_pairing(http)
    await hub.pool.execute(
        "UPDATE pairings SET code_expires_at = now() - interval '1 s' WHERE pairing_id = $1",
        created["pairingId"],
    )
    failed = await _pair_fails(created["code"], operator_nats_url, tmp_path / "d")
    assert failed.code == "pairing.invalid_code" and "expired" in str(failed)
    view = await get_pairing(http, created["pairingId"])
    assert view["redeemed"] is False and view["status"] == "pending"


@pytest.mark.parametrize(
    "typed",
    [
        lambda c: c.lower(),
        lambda c: c.replace("-", ""),
        lambda c: " ".join(normalize_code(c).lower()),
        lambda c: f"  {c[:4]} {c[5:9]}--{c[10:].lower()}  ",
    ],
)
async def test_typing_is_forgiving(http, operator_nats_url, tmp_path, typed):
    created = await create_pairing(http)
    code = typed(created["code"])
    assert code != created["code"]
    pairing = await pair(code, [operator_nats_url], DesktopStore(tmp_path / "d"))
    assert pairing.pairing_id == created["pairingId"]


async def test_brute_force_meets_delays_that_double(hub, http, operator_nats_url, tmp_path):
    """From the tenth wrong code, each failure locks the address out for twice as
    long as the last (1 s, 2 s, 4 s ... at most LOCKOUT): a guesser gets a handful
    of tries, an office whose somebody mistyped ten times waits a second."""
    created = await create_pairing(http)
    for attempt in range(1, MAX_FAILURES + 1):
        failed = await _pair_fails(
            _wrong_code(created["code"]), operator_nats_url, tmp_path / f"try{attempt}"
        )
        assert failed.code == "pairing.invalid_code", (attempt, failed.code)
        assert failed.retry_after is None
    # Keyed by the client's address as the server reports it (Nats-Request-Info).
    assert await _lock(hub) == pytest.approx(1.0, abs=0.5)
    for doubled in (2.0, 4.0):
        await _wait_out_lock(hub)
        failed = await _pair_fails(_wrong_code(created["code"]), operator_nats_url, tmp_path / "t")
        assert failed.code == "pairing.invalid_code"
        assert await _lock(hub) == pytest.approx(doubled, abs=0.5)
    # Deep into the doubling, even the right code is refused, with a retry time...
    await hub.pool.execute(
        "UPDATE bootstrap_failures SET failures = 30, locked_until = now() + $1", LOCKOUT
    )
    locked = await _pair_fails(created["code"], operator_nats_url, tmp_path / "right")
    assert locked.code == "bootstrap.rate_limited", locked.code
    assert LOCKOUT.total_seconds() - 60 < locked.retry_after <= LOCKOUT.total_seconds()
    assert (await get_pairing(http, created["pairingId"]))["redeemed"] is False
    # ... and the next failure is capped at LOCKOUT, not 2^20 s.
    await _wait_out_lock(hub)
    await _pair_fails(_wrong_code(created["code"]), operator_nats_url, tmp_path / "again")
    assert await _lock(hub) == pytest.approx(LOCKOUT.total_seconds(), abs=5)
    # The refused attempt did not spend the code: once the delay is over, it works.
    await _wait_out_lock(hub)
    pairing = await pair(created["code"], [operator_nats_url], DesktopStore(tmp_path / "ok"))
    assert pairing.pairing_id == created["pairingId"]


async def _lock(hub) -> float:
    """Seconds 127.0.0.1 is locked out for, from now."""
    rows = await hub.pool.fetch(
        "SELECT source, extract(epoch FROM locked_until - now()) AS left FROM bootstrap_failures"
    )
    assert [r["source"] for r in rows] == ["127.0.0.1"]
    return float(rows[0]["left"])


async def _wait_out_lock(hub) -> None:
    """Let the lock run out (moved into the past rather than slept through)."""
    await hub.pool.execute("UPDATE bootstrap_failures SET locked_until = now() - interval '1 s'")


async def test_nine_failures_do_not_lock(http, operator_nats_url, tmp_path):
    created = await create_pairing(http)
    for _ in range(MAX_FAILURES - 1):
        await _pair_fails(_wrong_code(created["code"]), operator_nats_url, tmp_path / "x")
    pairing = await pair(created["code"], [operator_nats_url], DesktopStore(tmp_path / "ok"))
    assert pairing.pairing_id == created["pairingId"]


async def test_old_failures_fall_out_of_the_window(hub, http, operator_nats_url, tmp_path):
    created = await create_pairing(http)
    for _ in range(MAX_FAILURES - 1):
        await _pair_fails(_wrong_code(created["code"]), operator_nats_url, tmp_path / "x")
    await hub.pool.execute(
        "UPDATE bootstrap_failures SET window_started_at = now() - interval '11 minutes'"
    )
    failed = await _pair_fails(_wrong_code(created["code"]), operator_nats_url, tmp_path / "y")
    assert failed.code == "pairing.invalid_code"
    row = await hub.pool.fetchrow("SELECT failures, locked_until FROM bootstrap_failures")
    assert row["failures"] == 1 and row["locked_until"] is None
    pairing = await pair(created["code"], [operator_nats_url], DesktopStore(tmp_path / "ok"))
    assert pairing.pairing_id == created["pairingId"]


async def test_lockout_is_per_source(hub, http, operator_nats_url, tmp_path):
    """One machine has one address, so the second source is driven through the hub's
    own redemption service with another address, as another replica would see it."""
    created = await create_pairing(http)
    for _ in range(MAX_FAILURES):
        await _pair_fails(_wrong_code(created["code"]), operator_nats_url, tmp_path / "x")
    # (a second's lock; held longer here so that a slow machine cannot outrun it)
    await hub.pool.execute("UPDATE bootstrap_failures SET locked_until = now() + interval '1 min'")
    locked = await _pair_fails(created["code"], operator_nats_url, tmp_path / "y")
    assert locked.code == "bootstrap.rate_limited"

    redemption = PairingRedemption(
        hub.pool,
        hub.audit,
        hub.pairings,
        hub.credentials,
        BootstrapLockout(hub.pool),
        code_key=hub.keys.derive_key("pairing-code"),
    )
    seed = new_user_seed()
    request = PairingRedeemRequest(
        code=created["code"],
        public_key=EdgeCredentials("", seed).public_key,
        reply_key=ReplyKey().public,
        device_name="elsewhere",
        client_version="test",
    )
    with pytest.raises(Refusal) as caught:  # the locked source, here too
        await redemption.redeem(request, "127.0.0.1")
    assert caught.value.code == "bootstrap.rate_limited" and caught.value.retry_after > 0
    reply = await redemption.redeem(request, "192.0.2.7")  # another address is not locked
    assert reply.pairing_id == created["pairingId"] and reply.tenant == TENANT
    assert (await get_pairing(http, created["pairingId"]))["deviceName"] == "elsewhere"


def test_request_source_reads_the_shared_client_info():
    def msg(headers):
        return SimpleNamespace(headers=headers)

    info = json.dumps({"acc": "ABC", "host": "203.0.113.9", "port": 4222, "id": 7})
    assert request_source(msg({"Nats-Request-Info": info})) == "203.0.113.9"
    assert request_source(msg(None)) == "unknown"
    assert request_source(msg({})) == "unknown"
    assert request_source(msg({"Nats-Request-Info": "not json"})) == "unknown"
    assert request_source(msg({"Nats-Request-Info": "[1]"})) == "unknown"
    assert request_source(msg({"Nats-Request-Info": json.dumps({"host": "h" * 500})})) == "h" * 128


async def test_the_redeem_reply_is_sealed_on_the_wire(http, operator_nats_url, tmp_path):
    """Every bootstrap client may read `_INBOX.>`: an eavesdropper sees only a sealed box."""
    from edges.desktop._agent import _bootstrap_options

    spy = await nats.connect(operator_nats_url, allow_reconnect=False, **_bootstrap_options())
    seen: list[bytes] = []

    async def listen(msg) -> None:
        seen.append(msg.data)

    try:
        await spy.subscribe("_INBOX.>", cb=listen)
        await flushed(spy)
        _, store = await redeem(http, operator_nats_url, tmp_path / "d")
        await eventually(lambda: seen, 5, what="the spy to see the reply")
    finally:
        await spy.close()
    user_jwt = EdgeCredentials.from_creds_file(store.creds_path).user_jwt
    assert len(seen) == 1
    raw = seen[0]
    assert json.loads(raw)["type"] == "bootstrap.sealed_reply"
    assert user_jwt.encode() not in raw and user_jwt.split(".")[1].encode() not in raw
    sealed = json.loads(raw)["data"]["sealed"]
    with pytest.raises(SealError):
        ReplyKey().open(sealed)


def test_a_sealed_reply_opens_only_with_its_own_key():
    mine, theirs = ReplyKey(), ReplyKey()
    box = seal(b"user jwt and all", mine.public)
    assert mine.open(box) == b"user jwt and all"
    with pytest.raises(SealError):
        theirs.open(box)
    assert seal(b"same", mine.public) != seal(b"same", mine.public), "fresh ephemeral key"
    head, body = box.split(".", 1)
    tampered = head + "." + ("A" if body[0] != "A" else "B") + body[1:]
    for bad in (tampered, body, "", "x.y", head + "."):
        with pytest.raises(SealError):
            mine.open(bad)
    with pytest.raises(SealError):
        seal(b"x", "not-a-key")
    assert BOOTSTRAP_USER_JWT and BOOTSTRAP_USER_SEED  # the public identity is importable


async def test_a_tenants_fleet_is_listed_page_by_page_with_filters(hub, http):
    """Every pairing exactly once across pages (a cursor, newest first), however
    many there are; filters by status, online and a part of the label."""
    tag = secrets.token_hex(4)
    made = [
        (await create_pairing(http, label=f"Fleet {tag} {'Mac' if i % 3 else 'PC'} {i}"))[
            "pairingId"
        ]
        for i in range(25)
    ]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 7, "label": f"fleet {tag}"}  # any case
        if cursor:
            params["cursor"] = cursor
        body = await api(http, "GET", f"/api/v1/tenants/{TENANT}/pairings", params=params)
        seen += [p["id"] for p in body["items"]]
        pages += 1
        cursor = body["nextCursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(made) and len(seen) == len(set(seen)), "each once"
    assert pages == 4
    pcs = await api(
        http,
        "GET",
        f"/api/v1/tenants/{TENANT}/pairings",
        params={"label": f"{tag} pc", "limit": 100},
    )
    assert len(pcs["items"]) == 9 and pcs["nextCursor"] is None
    pending = await api(
        http,
        "GET",
        f"/api/v1/tenants/{TENANT}/pairings",
        params={"label": tag, "status": "pending", "online": "false", "limit": 100},
    )
    assert len(pending["items"]) == 25
    online = await api(
        http, "GET", f"/api/v1/tenants/{TENANT}/pairings", params={"label": tag, "online": "true"}
    )
    assert online["items"] == []
    literal = await api(
        http, "GET", f"/api/v1/tenants/{TENANT}/pairings", params={"label": f"{tag}%"}
    )
    assert literal["items"] == [], "% in a label filter is a character, not a wildcard"


@pytest.mark.parametrize(
    "query",
    [{"cursor": "not-a-cursor"}, {"cursor": "WyJ4Il0"}, {"status": "asleep"}, {"online": "maybe"}],
)
async def test_bad_list_queries_are_clear_4xx(http, query):
    response = await http.get(f"/api/v1/tenants/{TENANT}/pairings", params=query)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
