"""The CLI channel: the provider (stdin lines in, deliveries out) and the
`cowork channel cli` command against a running hub with a real channel
credential, JetStream inbound, the instance's durable outbound consumer and
receipts."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import signal
import sys
from pathlib import Path

import nats.errors
import pytest
from fakeplatforms import webhook_request
from fakeplatforms.cli import FakeCli
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from channels import BadRequest, DeliveryFailed, InstanceConfig, VerificationFailed
from channels.cli._command import ChannelCli
from channels.providers._cli import CliProvider, CliSecrets, CliSettings
from schemas import (
    ChannelInbound,
    ChannelOutbound,
    ChannelReceipt,
    ChannelTarget,
    Envelope,
    Source,
    decode,
    parse_creds,
    render_creds,
    subjects,
)

COWORK = str(Path(sys.executable).parent / "cowork")
# Budget for a `cowork` CLI process to start, answer and exit: generous, since a
# loaded machine (pytest-xdist workers, other sessions) slows its imports; the
# tests assert what it says and its exit code, not how fast it starts.
CLI_BUDGET = 60
# The test's ephemeral consumers outlive their idle spells: the server's default (5 s)
# is less than a CLI start on a loaded machine, and a fetch then gets 503.
IDLE_KEPT = 600.0


def cli_provider(output, **settings) -> CliProvider:
    config = InstanceConfig(
        tenant="acme",
        instance_id="cli-unit",
        kind="cli",
        workspace_id="ws1",
        settings=CliSettings(**settings),
        secrets=CliSecrets(),
    )
    return CliProvider(config, None, output=output)


# --- the provider ------------------------------------------------------------------------------
def test_lines_become_messages_from_the_local_user():
    fake = FakeCli()
    provider = cli_provider(fake.output, user="ada")
    plain = fake.line("what changed today?")
    provider.verify(plain)
    [msg] = provider.parse(plain).messages
    assert (msg.target.chat_id, msg.sender.provider_user_id, msg.text) == (
        "local",
        "ada",
        "what changed today?",
    )
    assert msg.provider_kind == "cli" and msg.workspace_id == "ws1"
    [again] = provider.parse(fake.line("what changed today?")).messages
    assert again.id != msg.id  # typing the same line twice is two messages
    [command] = provider.parse(fake.line("/switch s-2")).messages
    assert command.is_command and command.command == "switch" and command.command_args == ["s-2"]
    [press] = provider.parse(fake.signed_button_press("tok-9", event_id="5")).messages
    assert press.event_type == "interaction" and press.interaction.token == "tok-9"
    [replayed] = provider.parse(fake.signed_message("x", event_id="5")).messages
    assert replayed.provider_event_id == "line-5"


def test_bad_lines_are_bad_requests_and_http_is_never_authentic():
    fake = FakeCli()
    provider = cli_provider(fake.output)
    for raw in ("   ", '{"text": 5}', '{"text": "x"', '{"interaction": {"id": "i"}}'):
        with pytest.raises(BadRequest):
            provider.parse(fake.line(raw))
    with pytest.raises(VerificationFailed):
        provider.verify(webhook_request(b"hello", {}))  # a POST to its webhook path


async def test_deliveries_are_printed_readably_and_edits_find_their_message():
    out = io.StringIO()
    provider = cli_provider(out)
    target = ChannelTarget(chat_id="local")
    sent = await provider.send(
        ChannelOutbound(
            delivery_id="d1", idempotency_key="d1", type="text", target=target, text="Working"
        )
    )
    await provider.send(
        ChannelOutbound(
            delivery_id="d2",
            idempotency_key="d2",
            type="edit",
            target=target,
            edit_of_delivery_id="d1",
            text="Working... done",
        )
    )
    assert out.getvalue().splitlines() == [
        f"[{sent.provider_message_id}] Working",
        f"[{sent.provider_message_id} edited] Working... done",
    ]
    with pytest.raises(DeliveryFailed) as caught:
        await provider.send(
            ChannelOutbound(
                delivery_id="d3",
                idempotency_key="d3",
                type="edit",
                target=target,
                edit_of_delivery_id="nope",
                text="x",
            )
        )
    assert caught.value.permanent


async def test_json_output_is_one_delivery_per_line():
    fake = FakeCli()
    provider = cli_provider(fake.output, output_format="json")
    await provider.send(
        ChannelOutbound(
            delivery_id="d1",
            idempotency_key="d1",
            type="text",
            target=ChannelTarget(chat_id="local"),
            text="hi",
        )
    )
    [record] = fake.delivered()
    assert record["deliveryId"] == "d1" and record["text"] == "hi" and record["messageId"]


# --- the command against a hub --------------------------------------------------------------------
@pytest.fixture
async def cli_instance(hub, tmp_path):
    """A channel credential and durable outbound consumer for a fresh cli instance."""
    from hub.auth import _jwt
    from hub.auth._permissions import Principal
    from schemas import PrincipalKind

    instance, workspace = f"cli-{secrets.token_hex(4)}", "ws-cli"
    seed = _jwt.new_seed("user")
    issued = await hub.credentials.issue(
        Principal(PrincipalKind.CHANNEL, "acme", instance, workspaces=(workspace,)),
        _jwt.public_key(seed),
    )
    creds = tmp_path / "cli.creds"
    creds.write_text(render_creds(issued.user_jwt, seed))
    outbound = subjects.CHANNEL_OUTBOUND.build(tenant="acme", instance_id=instance)
    await hub.js.add_consumer(
        "CW_CHANNEL_OUTBOUND",
        ConsumerConfig(
            durable_name=subjects.edge_consumer("channel", instance),
            filter_subject=outbound,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=5,
        ),
    )
    return instance, workspace, creds


async def start_cli(hub, instance, workspace, creds, *extra):
    return await asyncio.create_subprocess_exec(
        COWORK,
        "channel",
        "cli",
        instance,
        "--nats",
        hub.settings.nats_servers[0],
        "--creds",
        str(creds),
        "--tenant",
        "acme",
        "--workspace",
        workspace,
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_until(stream, needle: str, timeout: float = CLI_BUDGET) -> list[str]:
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"output ended before {needle!r}: {lines}"
            lines.append(line.rstrip("\n"))
            if needle in line:
                return lines


async def exit_code(proc) -> int:
    """The command's exit code. One that does not exit in time fails the test with
    every thread's stack (`cowork` prints them on SIGUSR1): where it waits."""
    try:
        return await asyncio.wait_for(asyncio.shield(proc.wait()), CLI_BUDGET)
    except TimeoutError:
        state = "running"
        try:
            proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(2)
            proc.kill()
        except ProcessLookupError:  # gone, yet its pipes were not closed
            state = "exited"
        err = await asyncio.wait_for(proc.stderr.read(), CLI_BUDGET)
        pytest.fail(f"the command did not end in {CLI_BUDGET} s ({state}); stderr:\n{err.decode()}")


def outbound(delivery_id: str, text: str, **fields) -> bytes:
    delivery = ChannelOutbound(
        delivery_id=delivery_id,
        idempotency_key=delivery_id,
        target=ChannelTarget(chat_id="local"),
        text=text,
        **{"type": "text", **fields},
    )
    return Envelope.wrap(
        delivery, source=Source(principal_kind="hub", principal_id="hub"), tenant="acme"
    ).encode()


async def test_the_command_publishes_lines_and_prints_deliveries(hub, cli_instance):
    instance, workspace, creds = cli_instance
    inbound = await hub.js.pull_subscribe(
        subjects.CHANNEL_INBOUND.build(tenant="acme", instance_id=instance, workspace_id=workspace),
        stream="CW_CHANNEL_INBOUND",
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=IDLE_KEPT),
    )
    proc = await start_cli(hub, instance, workspace, creds, "--user", "ada")
    try:
        proc.stdin.write(b"please summarise the build\n")
        await proc.stdin.drain()
        [landed] = await inbound.fetch(1, timeout=CLI_BUDGET)
        envelope = decode(landed.data, ChannelInbound)
        msg = envelope.data
        assert (msg.text, msg.sender.provider_user_id, msg.provider) == (
            "please summarise the build",
            "ada",
            instance,
        )
        assert landed.headers["Nats-Msg-Id"] == msg.id
        assert (envelope.source.principal_kind, envelope.source.principal_id) == (
            "channel",
            instance,
        )

        out = subjects.CHANNEL_OUTBOUND.build(tenant="acme", instance_id=instance)
        await hub.js.publish(out, outbound("dlv-1", "The build is green."))
        printed = await read_until(proc.stdout, "The build is green.")
        local = printed[-1].split("]")[0].lstrip("[")
        await hub.js.publish(
            out,
            outbound(
                "dlv-2", "The build is green. 12 tests ran.", type="edit", edit_message_id=local
            ),
        )
        assert (
            "edited] The build is green. 12 tests ran."
            in (await read_until(proc.stdout, "12 tests ran."))[-1]
        )

        # Created late: an idle ephemeral consumer is removed by the server after a while.
        receipts = await hub.js.pull_subscribe(
            subjects.CHANNEL_RECEIPT.build(tenant="acme", instance_id=instance),
            stream="CW_CHANNEL_RECEIPTS",
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=IDLE_KEPT),
        )
        seen = []
        async with asyncio.timeout(CLI_BUDGET):
            while len(seen) < 2:
                for raw in await receipts.fetch(2, timeout=CLI_BUDGET):
                    seen.append(decode(raw.data, ChannelReceipt).data)
        assert [(r.delivery_id, r.status, r.provider_message_id) for r in seen] == [
            ("dlv-1", "sent", local),
            ("dlv-2", "sent", local),
        ]
        info = await hub.js.consumer_info(
            "CW_CHANNEL_OUTBOUND", subjects.edge_consumer("channel", instance)
        )
        assert info.num_ack_pending == 0 and info.num_pending == 0
    finally:
        proc.stdin.close()
        code = await exit_code(proc)
    assert code == 0
    err = (await proc.stderr.read()).decode()
    assert "Traceback" not in err and "CancelledError" not in err, err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
async def test_quitting_with_a_signal_is_clean(hub, cli_instance, sig):
    """Ctrl-C (or SIGTERM) while waiting for input: exit 0, no traceback, no abort."""
    instance, workspace, creds = cli_instance
    proc = await start_cli(hub, instance, workspace, creds)
    await read_until(proc.stderr, "Ctrl-C quits")
    proc.send_signal(getattr(signal, sig))
    code = await exit_code(proc)
    err = (await proc.stderr.read()).decode()
    assert code == 0, err
    assert "Traceback" not in err and "Fatal Python error" not in err, err


async def test_sigusr1_prints_every_stack_and_the_command_goes_on(hub, cli_instance):
    instance, workspace, creds = cli_instance
    proc = await start_cli(hub, instance, workspace, creds)
    await read_until(proc.stderr, "Ctrl-C quits")
    proc.send_signal(signal.SIGUSR1)
    dump = await read_until(proc.stderr, "_command.py")  # the stdin thread's read
    assert any("most recent call first" in line for line in dump), dump
    proc.stdin.close()  # still running: Ctrl-D ends it as usual
    assert await exit_code(proc) == 0


class _NoCredsCli(ChannelCli):
    def _workspace(self, args):
        return "ws-1"


class _CancelDroppingPull:
    """A fetch whose wait, like asyncio.wait_for in Python 3.11, can end in a timeout
    although the task was cancelled in it: the cancel is then never raised."""

    def __init__(self) -> None:
        self.fetches = 0
        self.drop = True

    async def fetch(self, batch: int, timeout: float):
        self.fetches += 1
        try:
            await asyncio.sleep(timeout)
        except asyncio.CancelledError:
            if not self.drop:
                raise
        raise nats.errors.TimeoutError


async def test_the_delivery_loop_ends_on_stop_even_when_a_fetch_drops_the_cancel():
    import argparse

    cli = _NoCredsCli(
        argparse.Namespace(instance="cli-1", tenant="acme", user="ada", format="text")
    )
    pull = _CancelDroppingPull()
    printing = asyncio.create_task(cli._print(None, pull))
    await asyncio.sleep(0.05)
    cli.stop.set()
    printing.cancel()  # lands in the fetch, which drops it
    done, _ = await asyncio.wait({printing}, timeout=5)
    pull.drop = False
    if not done:
        printing.cancel()
    assert done, f"the loop went on fetching after the stop ({pull.fetches} fetches)"
    assert pull.fetches <= 2


async def test_the_command_fails_clearly(hub, cli_instance, tmp_path):
    instance, workspace, creds = cli_instance
    missing = await start_cli(hub, "cli-unknown", workspace, creds)
    _, err = await asyncio.wait_for(missing.communicate(b""), CLI_BUDGET)
    assert missing.returncode == 5, err
    assert err.decode().strip() == (
        "cowork: error: cannot open the delivery queue: this "
        "credential is not for instance 'cli-unknown' of tenant "
        "'acme'"
    )

    from hub.auth import _jwt
    from hub.auth._permissions import Principal
    from schemas import PrincipalKind

    seed = _jwt.new_seed("user")  # a valid credential, but the hub made no queue for it
    issued = await hub.credentials.issue(
        Principal(PrincipalKind.CHANNEL, "acme", "cli-noqueue", workspaces=(workspace,)),
        _jwt.public_key(seed),
    )
    (tmp_path / "noqueue.creds").write_text(render_creds(issued.user_jwt, seed))
    proc = await start_cli(hub, "cli-noqueue", workspace, tmp_path / "noqueue.creds")
    _, err = await asyncio.wait_for(proc.communicate(b""), CLI_BUDGET)
    assert (
        proc.returncode == 5
        and "the hub has no delivery queue for instance 'cli-noqueue'" in err.decode()
    )

    proc = await asyncio.create_subprocess_exec(
        COWORK,
        "channel",
        "cli",
        instance,
        "--nats",
        "nats://127.0.0.1:1",
        "--creds",
        str(creds),
        "--tenant",
        "acme",
        "--workspace",
        workspace,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), CLI_BUDGET)
    assert proc.returncode == 4 and "cannot connect to NATS at nats://127.0.0.1:1" in err.decode()

    bad = tmp_path / "bad.creds"
    bad.write_text(json.dumps({"not": "creds"}))
    proc = await start_cli(hub, instance, workspace, bad)
    _, err = await asyncio.wait_for(proc.communicate(b""), CLI_BUDGET)
    assert proc.returncode == 3 and "is not a NATS .creds file" in err.decode()


async def test_login_writes_a_working_credential_for_a_cli_instance(hub, http, tmp_path):
    """`cowork channel login` makes the key here and gets the hub to sign it: the .creds
    file (0600) then serves `cowork channel cli` for that instance only."""
    instance, workspace = f"cli-{secrets.token_hex(4)}", f"ws-{secrets.token_hex(3)}"
    created = await http.post(
        "/api/v1/tenants/acme/channel-instances",
        json={
            "instanceId": instance,
            "kind": "cli",
            "workspaceId": workspace,
            "authority": "cloud_worker",
        },
    )
    assert created.status_code == 201, created.text
    creds = tmp_path / "login.creds"
    env = {"COWORK_ADMIN_TOKEN": hub.test_admin_token, "PATH": "/usr/bin:/bin"}

    async def login(*args: str, token: bool = True) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            COWORK,
            "channel",
            "login",
            *args,
            "--hub-url",
            hub.http_url,
            "--tenant",
            "acme",
            env=env if token else {"PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), CLI_BUDGET)
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await login(instance, "--creds-out", str(creds))
    assert code == 0, err
    assert f"Wrote {creds}" in out and creds.stat().st_mode & 0o777 == 0o600
    # The next step is printed complete: the hub knows its NATS URL and the workspace.
    assert f"--nats {hub.settings.nats_servers[0]}" in out and "WORKSPACE" not in out
    assert workspace in out and "claim code" in out
    user_jwt, seed = parse_creds(creds.read_text())
    assert seed.startswith(b"SU") and user_jwt.count(".") == 2

    code, _, err = await login(instance, "--creds-out", str(creds))
    assert code == 2 and "exists" in err  # never overwrites a credential
    code, _, err = await login("cli-nobody", "--creds-out", str(tmp_path / "x.creds"))
    assert code == 3 and "404" in err
    code, _, err = await login(instance, "--creds-out", str(tmp_path / "y.creds"), token=False)
    assert code == 2 and "COWORK_ADMIN_TOKEN" in err

    inbound = await hub.js.pull_subscribe(
        subjects.CHANNEL_INBOUND.build(tenant="acme", instance_id=instance, workspace_id=workspace),
        stream="CW_CHANNEL_INBOUND",
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=IDLE_KEPT),
    )
    wrong = await start_cli(hub, instance, "ws-elsewhere", creds)
    _, err = await asyncio.wait_for(wrong.communicate(b""), CLI_BUDGET)
    assert wrong.returncode == 3 and err.decode().strip() == (
        f"cowork: error: this credential is bound to workspace {workspace!r}, not "
        "'ws-elsewhere'; leave --workspace out"
    )
    proc = await asyncio.create_subprocess_exec(  # no --workspace: the credential's
        COWORK,
        "channel",
        "cli",
        instance,
        "--nats",
        hub.settings.nats_servers[0],
        "--creds",
        str(creds),
        "--tenant",
        "acme",
        "--user",
        "grace",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        proc.stdin.write(b"hello from a logged-in terminal\n")
        await proc.stdin.drain()
        [landed] = await inbound.fetch(1, timeout=CLI_BUDGET)
        assert decode(landed.data, ChannelInbound).data.text == "hello from a logged-in terminal"
    finally:
        proc.stdin.close()
        assert await asyncio.wait_for(proc.wait(), CLI_BUDGET) == 0


async def test_login_is_refused_for_every_kind_but_cli(hub, http, tmp_path):
    """A hosted instance's bus identity is the hub's alone: a credential for a key held
    elsewhere would speak as its chat users and take its deliveries."""
    from hub.auth import nats_jwt as _jwt

    instance = f"tg-{secrets.token_hex(4)}"
    created = await http.post(
        "/api/v1/tenants/acme/channel-instances",
        json={
            "instanceId": instance,
            "kind": "telegram",
            "workspaceId": "ws-tg",
            "authority": "cloud_worker",
            "settings": {"apiBase": "http://127.0.0.1:9", "allowLoopbackHttp": True},
            "secrets": {"botToken": "123:abc", "webhookSecret": "whs_0123456789abcdef"},
        },
    )
    assert created.status_code == 201, created.text
    creds = tmp_path / "tg.creds"
    proc = await asyncio.create_subprocess_exec(
        COWORK,
        "channel",
        "login",
        instance,
        "--creds-out",
        str(creds),
        "--hub-url",
        hub.http_url,
        "--tenant",
        "acme",
        env={"COWORK_ADMIN_TOKEN": hub.test_admin_token, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), CLI_BUDGET)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1, lines
    assert "channel_instance.hosted_kind" in lines[0] and "only for kind 'cli'" in lines[0]
    assert not creds.exists()
    # The admin API's other credential route cannot mint it either.
    key = _jwt.public_key(_jwt.new_seed("user"))
    r = await http.post(
        f"/api/v1/tenants/acme/channel-instances/{instance}/credentials", json={"publicKey": key}
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "channel_instance.hosted_kind"
    r = await http.post(
        "/api/v1/tenants/acme/credentials",
        json={
            "kind": "channel",
            "principalId": instance,
            "publicKey": key,
            "workspaces": ["ws-tg"],
        },
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "kind_not_issuable"
    principals = (await http.get("/api/v1/tenants/acme/principals")).json()["items"]
    assert not any(p["principalId"] == instance and key in str(p) for p in principals)
