"""`cowork remote` drives a sealed Desktop end to end, as users would, through real
parts (operator-mode NATS, PostgreSQL, the hub, `opencode serve` with the fake
model): keys made on the controller, enrolment asked through the hub and approved
with `cowork desktop controllers add` on the Desktop, `cowork desktop trust sealed`,
a prompt, a tool permission approved remotely, and the reply read decrypted from
the hub's SSE. Then a byte search of everything the hub side wrote (PostgreSQL's
data directory and tables, the JetStream store, the server and hub logs) finds the
marker that was in the prompt and in the model's reply nowhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from pathlib import Path

import asyncpg
import pytest
from desktopkit import TENANT, cowork, eventually, pair_and_start
from opencode_env import BASH_OUTPUT, RUN_BASH

from edges.local import EmbeddedPostgres
from edges.remote import ControllerStore, RemoteClient

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def hub_options():
    return {"command_lease_seconds": 10}


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and needle in path.read_bytes():
                hits.append(str(path))
    return hits


async def _rows_holding(dsn: str, needle: str) -> list[str]:
    """Every user table of the hub's database, each row as text."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch(
            "SELECT quote_ident(table_name) AS t FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        hits = []
        for table in tables:
            found = await conn.fetchval(
                f"SELECT count(*) FROM {table['t']} x WHERE strpos(x::text, $1) > 0", needle
            )
            if found:
                hits.append(table["t"])
        return hits
    finally:
        await conn.close()


async def _cli(*args: str, env: dict) -> str:
    code, out, err = await cowork(*args, env=env)
    assert code == 0, (args, out, err)
    return out


async def test_cowork_remote_drives_a_sealed_desktop_and_the_hub_keeps_no_plaintext(
    hub,
    http,
    opencode,
    operator_nats_url,
    operator_nats_server,
    postgres_server,
    postgres_admin_dsn,
    database_url_module,
    tmp_path,
    caplog,
):
    caplog.set_level(logging.DEBUG)
    marker = f"MARKER{uuid.uuid4().hex}"
    desktop_dir, remote_dir = tmp_path / "desktop", tmp_path / "remote"
    desktop = await pair_and_start(
        http,
        operator_nats_url,
        desktop_dir,
        opencode.url,
        policy={"remoteApprovals": "remote_allowed"},
    )
    env = {"COWORK_ADMIN_TOKEN": hub.test_admin_token, "COWORK_REMOTE_STATE_DIR": str(remote_dir)}
    pid = desktop.pairing_id
    try:
        # On the controller: keys, then ask for enrolment (through the hub).
        await _cli("remote", "init", "--label", "my phone", env=env)
        asked = await _cli(
            "remote", "enrol", "--hub", hub.http_url, "--tenant", TENANT, "--pairing", pid, env=env
        )
        fingerprint = re.search(r"controllers add ([A-Z2-7-]{19})", asked).group(1)  # type: ignore[union-attr]
        # On the Desktop: the person compares the fingerprint and approves; then seals.
        state = ["--state-dir", str(desktop_dir)]
        listed = json.loads(await _cli("desktop", "controllers", "list", "--json", *state, env={}))
        assert [p["fingerprint"] for p in listed["pending"]] == [fingerprint]
        assert listed["desktopFingerprint"] in asked
        await _cli("desktop", "controllers", "add", fingerprint, *state, env={})
        await _cli("desktop", "trust", "sealed", *state, env={})

        async def send(kind: str, session: str | None = None, payload: dict | None = None):
            args = ["remote", "send", kind]
            args += ["--session", session] if session else []
            args += ["--payload", json.dumps(payload)] if payload else []
            return json.loads(await _cli(*args, env=env))

        created = await send("create_session", payload={"title": "sealed"})
        session = created["result"]["session"]["id"]

        client = RemoteClient(
            ControllerStore(remote_dir), ControllerStore(remote_dir).link(pid), hub.test_admin_token
        )
        frames: list[dict] = []

        async def follow() -> None:
            async for item in client.follow(0):
                frames.append(item)

        tail = asyncio.create_task(follow())
        try:
            queued = await send("prompt", session, {"text": f"say {marker}"})
            assert queued["result"]["status"] == "queued", queued

            def streamed() -> str:
                return "".join(
                    f["payload"]["properties"].get("delta", "")
                    for f in frames
                    if f["type"] == "session.event"
                    and (f["payload"] or {}).get("type") == "message.part.delta"
                )

            await eventually(lambda: f"reply to: say {marker}" in streamed(), 30, 0.1, "the reply")

            await send("prompt", session, {"text": f"please {RUN_BASH}"})

            def permission() -> str | None:
                for f in frames:
                    payload = f["payload"] or {}
                    if payload.get("type") == "permission.asked":
                        return payload["properties"]["id"]
                return None

            permission_id = await eventually(permission, 30, 0.1, "permission.asked")
            approved = await send(
                "permission.respond", session, {"permissionId": permission_id, "allowed": True}
            )
            assert approved["result"]["status"] == "completed", approved
            await eventually(
                lambda: any(BASH_OUTPUT in json.dumps(f["payload"]) for f in frames),
                30,
                0.1,
                "the tool's output",
            )
        finally:
            tail.cancel()
            await asyncio.gather(tail, return_exceptions=True)
            await client.aclose()
        assert all(f["payload"] is not None for f in frames), "every frame opens"
        # The same, as a user reads it: every event of the session opened, the reply in it.
        printed = [
            json.loads(line)
            for line in (await _cli("remote", "events", env=env)).split("\n")
            if line
        ]
        ours = [e for e in printed if e["sessionId"] == session]
        assert ours and all(e["sealed"] and e["payload"] is not None for e in ours)
        assert f"reply to: say {marker}" in json.dumps(ours)
        # Keys and local state are the owner's only, on both ends.
        for private in (
            remote_dir / "controller.json",
            desktop_dir / "sealed.json",
            desktop_dir / "desktop-seal.key",
            desktop_dir / "controller-requests.json",
        ):
            assert private.stat().st_mode & 0o077 == 0, private
        assert remote_dir.stat().st_mode & 0o077 == 0
    finally:
        await desktop.stop()

    # The byte search, over everything the hub side holds.
    admin = await asyncpg.connect(postgres_admin_dsn)
    try:
        await admin.execute("CHECKPOINT")  # shared buffers out to the data files
    finally:
        await admin.close()
    await asyncio.sleep(0.5)  # JetStream's file store flushes its write buffer
    stores = [operator_nats_server.store_dir]
    if isinstance(postgres_server, EmbeddedPostgres):
        stores.append(postgres_server.data_dir)  # pgdata (heap, WAL) and postgres.log
    for root in stores:
        # Positive control: clear routing metadata (the session id) is found there.
        assert _files_holding(root, session.encode()), f"the search must see {root}"
        assert _files_holding(root, marker.encode()) == [], f"plaintext under {root}"
    assert await _rows_holding(database_url_module, session), "routing metadata is in clear"
    assert await _rows_holding(database_url_module, marker) == []
    assert session in caplog.text or "cowork" in caplog.text
    assert marker not in caplog.text


async def test_sealed_clis_fail_in_one_line(tmp_path):
    env = {"COWORK_REMOTE_STATE_DIR": str(tmp_path / "r"), "COWORK_ADMIN_TOKEN": "t"}
    failures = [
        (("remote", "send", "status"), env, "run `cowork remote init` first"),
        (("remote", "send", "status"), {**env, "COWORK_ADMIN_TOKEN": ""}, "COWORK_ADMIN_TOKEN"),
        (
            ("desktop", "controllers", "add", "abcd efgh", "--state-dir", str(tmp_path / "d")),
            {},
            "no pending enrolment request with fingerprint ABCD-EFGH",
        ),
        (("remote", "enrol", "cowork+enrol://enrol?v=1&tenant=t"), env, "[controller.bad_link]"),
        (
            ("desktop", "controllers", "invite", "--state-dir", str(tmp_path / "d")),
            {},
            "this Desktop is not paired",
        ),
    ]
    for args, extra, message in failures:
        code, out, err = await cowork(*args, env=extra)
        assert code != 0 and message in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
