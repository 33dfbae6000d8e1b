"""`cowork desktop ...` as a user runs it: a real process against a real hub."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat

import pytest
from desktopkit import (
    COWORK,
    TENANT,
    cowork,
    create_pairing,
    eventually,
    get_pairing,
    run_command,
    wait_online,
)
from opencode_env import OpenCodeServer

from edges.local import free_port

pytestmark = pytest.mark.timeout(180)


async def test_pair_status_and_revoke_offline(http, operator_nats_url, tmp_path):
    state = tmp_path / "state"
    created = await create_pairing(http, label="cli laptop")
    code, out, err = await cowork(
        "desktop",
        "pair",
        created["code"].lower().replace("-", " "),
        "--hub",
        operator_nats_url,
        "--state-dir",
        str(state),
        "--device-name",
        "cli-box",
    )
    assert code == 0, err
    assert created["pairingId"] in out and "cowork desktop run" in out
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    creds = state / "desktop.creds"
    assert stat.S_IMODE(os.stat(creds).st_mode) == 0o600
    assert "BEGIN NATS USER JWT" in creds.read_text()
    assert (await get_pairing(http, created["pairingId"]))["deviceName"] == "cli-box"

    again, _, err = await cowork(
        "desktop", "pair", created["code"], "--hub", operator_nats_url, "--state-dir", str(state)
    )
    assert again == 1 and "already holds pairing" in err and "Traceback" not in err

    code, out, _ = await cowork("desktop", "status", "--json", "--state-dir", str(state))
    report = json.loads(out)
    assert report["pairingId"] == created["pairingId"] and report["status"] == "enabled"
    assert report["policy"]["remoteApprovals"] == "local_confirmation"

    # The hub is unreachable: local revocation still happens.
    pairing_file = state / "pairing.json"
    pairing = json.loads(pairing_file.read_text())
    pairing["hub_urls"] = [f"nats://127.0.0.1:{free_port()}"]
    pairing_file.write_text(json.dumps(pairing))
    code, out, err = await cowork(
        "desktop", "revoke", "--reason", "selling it", "--state-dir", str(state)
    )
    assert code == 0, err
    assert "Revoked" in out and "could not be told" in out
    assert not creds.exists()
    code, out, _ = await cowork("desktop", "status", "--json", "--state-dir", str(state))
    assert json.loads(out)["status"] == "revoked"
    audit = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    assert [a["action"] for a in audit] == ["pairing.paired", "pairing.revoked"]
    code, _, err = await cowork("desktop", "run", "--state-dir", str(state))
    assert code == 1 and "revoked" in err and "Traceback" not in err


async def test_pair_refusals_are_one_line(http, operator_nats_url, tmp_path):
    code, _, err = await cowork(
        "desktop",
        "pair",
        "ZZZZ-ZZZZ-ZZ",
        "--hub",
        operator_nats_url,
        "--state-dir",
        str(tmp_path / "a"),
    )
    assert code == 1 and "pairing failed [" in err and "Traceback" not in err
    code, _, err = await cowork(
        "desktop",
        "pair",
        "ZZZZ-ZZZZ-ZZ",
        "--hub",
        f"nats://127.0.0.1:{free_port()}",
        "--state-dir",
        str(tmp_path / "b"),
        "--timeout",
        "2",
    )
    assert code == 1 and "cannot reach" in err
    code, _, err = await cowork(
        "desktop", "pair", "X", "--state-dir", str(tmp_path / "c"), env={"COWORK_HUB_URL": ""}
    )
    assert code == 2 and "--hub" in err
    code, _, err = await cowork("desktop", "status", "--state-dir", str(tmp_path / "none"))
    assert code == 1 and "not paired" in err


async def test_run_serves_until_sigterm(http, operator_nats_url, tmp_path):
    state = tmp_path / "state"
    created = await create_pairing(http)
    assert (
        await cowork(
            "desktop",
            "pair",
            created["code"],
            "--hub",
            operator_nats_url,
            "--state-dir",
            str(state),
        )
    )[0] == 0
    async with OpenCodeServer() as opencode:
        process = await asyncio.create_subprocess_exec(
            COWORK,
            "desktop",
            "run",
            "--opencode",
            opencode.url,
            "--state-dir",
            str(state),
            "--heartbeat-interval",
            "1",
            "--log-format",
            "json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await wait_online(http, created["pairingId"], timeout=20)
            done = await run_command(http, created["pairingId"], "status")
            assert done["status"] == "completed", done
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, err.decode()
        await eventually(lambda: get_pairing(http, created["pairingId"]), 2)
        assert (await get_pairing(http, created["pairingId"]))["online"] is False
    response = await http.get(f"/api/v1/tenants/{TENANT}/pairings/{created['pairingId']}")
    assert response.json()["lastCommandSequence"] == 1
