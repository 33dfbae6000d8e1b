"""`cowork channel cli`: a terminal as a channel instance of the hub.

The process connects to NATS with the instance's own credential file (a
`channel` principal: it may publish only its own inbound and receipt subjects
and pull only its own durable consumer), publishes every stdin line as a
ChannelInbound on `cw.<tenant>.chan.<instance>.in.<workspace>` (JetStream,
deduplicated by message id), and prints the deliveries it pulls from its
consumer `channel-<instance>`, acknowledging each and publishing a receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats
from nats.js.errors import NotFoundError

from schemas import (
    ChannelOutbound,
    ChannelReceipt,
    ContractError,
    DeliveryStatus,
    Envelope,
    PrincipalKind,
    Source,
    decode,
    subjects,
)

from .._provider import ChannelError, DeliveryFailed, InstanceConfig, WebhookRequest
from ..providers import STDIN_METHOD, CliProvider, CliSecrets, CliSettings
from ._bus import (
    EXIT_QUEUE,
    CommandFailed,
    add_instance_command,
    check_creds,
    connect_bus,
    credential_workspace,
    token_type,
)
from ._login import add_login_command
from ._run import add_run_command

MAX_ATTEMPTS = 5
SHUTDOWN_STEP = 5.0  # seconds for each step of the way out
DESCRIPTION = """\
Use this terminal as a channel instance: every line you type becomes a message
to the instance's workspace (plain text, a /command, or a JSON object
{"text": ..., "interaction": {"id": ..., "token": ...}}), and the workspace's
answers are printed as they arrive. Ctrl-D ends input (see --linger); Ctrl-C
quits.

The instance (kind "cli") and its credential file come from the hub's admin API.
"""


def add_channel_commands(
    commands: Any, more: Callable[[Any], None] | None = None
) -> argparse.ArgumentParser:
    """Add `channel cli`, `channel login` and `channel run` to the `cowork` parser
    (args.channel_handler runs it); `more` adds subcommands made elsewhere (`channel
    enrol`, which needs the controller library that channel code may not import)."""
    channel = commands.add_parser("channel", help="channel instances run from this machine")
    sub = channel.add_subparsers(dest="channel_command", metavar="CHANNEL_COMMAND", required=True)
    cli = add_instance_command(
        sub,
        "cli",
        help="chat with a workspace from this terminal",
        description=DESCRIPTION,
        instance_help="the channel instance id (kind cli), e.g. cli-ada",
    )
    cli.add_argument("--user", help="who you are in the chat (default: your login name)")
    cli.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="how deliveries are printed (default: %(default)s)",
    )
    cli.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after stdin ends, keep printing answers this long (default: 0)",
    )
    cli.set_defaults(channel_handler=run_channel_command)
    add_login_command(sub, token_type)
    add_run_command(sub)
    if more is not None:
        more(sub)
    return channel


def run_channel_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(ChannelCli(args).run())
    except CommandFailed as exc:
        print(f"cowork: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


class ChannelCli:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.instance, self.tenant = args.instance, args.tenant
        self.workspace = self._workspace(args)
        self.config = InstanceConfig(
            tenant=self.tenant,
            instance_id=self.instance,
            kind="cli",
            workspace_id=self.workspace,
            settings=CliSettings(user=args.user or None, output_format=args.format),
            secrets=CliSecrets(),
        )
        self.provider = CliProvider(self.config, None, output=sys.stdout)
        self.source = Source(principal_kind=PrincipalKind.CHANNEL, principal_id=self.instance)
        self.sent: set[str] = set()  # delivery ids printed by this process
        self.stop = asyncio.Event()
        self.errors: list[str] = []  # what the server reported (auth, permissions)

    async def run(self) -> int:
        self._check_creds()
        nc = await self._connect()
        try:
            js = nc.jetstream()
            pull = await self._open_queue(js)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop.set)
            print(
                f"cowork: {self.instance} -> workspace {self.workspace}; type a message "
                "(Ctrl-D ends input, Ctrl-C quits)",
                file=sys.stderr,
            )
            tasks = [
                asyncio.create_task(self._read(js)),
                asyncio.create_task(self._print(js, pull)),
            ]
            await self.stop.wait()
            for task in tasks:
                task.cancel()
            # Bounded like every step of the way out: Ctrl-D or Ctrl-C ends the command
            # within seconds whatever the server (or a wedged library call) does.
            done, _ = await asyncio.wait(tasks, timeout=SHUTDOWN_STEP)
            for task in done:  # retrieved, so none is reported as never retrieved
                if not task.cancelled():
                    task.exception()
        except BaseException:
            await self._close(nc)
            raise
        # A flush sends the last acks and receipts; not drain(), whose cancelled
        # internals print a CancelledError traceback.
        with contextlib.suppress(Exception):
            await nc.flush(timeout=SHUTDOWN_STEP)
        await self._close(nc)
        return 0

    @staticmethod
    async def _close(nc: Any) -> None:
        if not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), SHUTDOWN_STEP)

    async def _open_queue(self, js: Any) -> Any:
        """Bind to the instance's durable consumer (the hub creates it with the instance)."""
        stream = subjects.EDGE_CONSUMERS["channel"]
        durable = subjects.edge_consumer("channel", self.instance)
        try:
            await js.consumer_info(stream, durable, timeout=5)
        except NotFoundError:
            raise CommandFailed(
                f"the hub has no delivery queue for instance {self.instance!r} "
                f"(is it a cli instance of tenant {self.tenant!r}?)",
                EXIT_QUEUE,
            ) from None
        except Exception as exc:  # noqa: BLE001 - a refused or unanswered request
            # A credential of another instance may not use this instance's reply inbox
            # or queue: the server refuses it and the request times out.
            denied = any("permissions violation" in e.lower() for e in self.errors)
            reason = (
                f"this credential is not for instance {self.instance!r} of tenant {self.tenant!r}"
                if denied
                else f"no answer from JetStream ({type(exc).__name__})"
            )
            raise CommandFailed(f"cannot open the delivery queue: {reason}", EXIT_QUEUE) from None
        return await js.pull_subscribe_bind(durable=durable, stream=stream)

    def _workspace(self, args: argparse.Namespace) -> str:
        return credential_workspace(args)

    def _check_creds(self) -> None:
        check_creds(self.args.creds)

    async def _connect(self) -> Any:
        return await connect_bus(self.args, self.errors, reconnect=False)

    # --- stdin -> inbound ----------------------------------------------------------------
    async def _read(self, js: Any) -> None:
        lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def pump() -> None:  # a daemon thread: a blocked read never holds up exit
            # Raw reads of fd 0, not sys.stdin's buffered reader: a daemon thread
            # blocked inside that reader's lock aborts the interpreter at exit.
            pending = b""
            fd = sys.stdin.fileno()
            while chunk := os.read(fd, 65536):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    loop.call_soon_threadsafe(lines.put_nowait, raw + b"\n")
            if pending:
                loop.call_soon_threadsafe(lines.put_nowait, pending)
            loop.call_soon_threadsafe(lines.put_nowait, None)

        threading.Thread(target=pump, name="stdin", daemon=True).start()
        while (raw := await lines.get()) is not None:
            if raw.strip():
                await self._publish_line(js, raw)
        await asyncio.sleep(max(self.args.linger, 0.0))
        self.stop.set()

    async def _publish_line(self, js: Any, raw: bytes) -> None:
        request = WebhookRequest(
            method=STDIN_METHOD,
            path="stdin",
            query={},
            headers={},
            body=raw,
            remote="local",
            received_at=datetime.now(UTC),
            now=time.time(),
        )
        try:
            self.provider.verify(request)
            messages = self.provider.parse(request).messages
        except ChannelError as exc:
            print(f"cowork: line not sent: {exc.message}", file=sys.stderr)
            return
        subject = subjects.CHANNEL_INBOUND.build(
            tenant=self.tenant, instance_id=self.instance, workspace_id=self.workspace
        )
        for message in messages:
            envelope = Envelope.wrap(
                message, source=self.source, tenant=self.tenant, workspace=self.workspace
            )
            try:
                await js.publish(
                    subject, envelope.encode(), headers={"Nats-Msg-Id": message.id}, timeout=5
                )
            except Exception as exc:  # noqa: BLE001 - the user retypes; the process goes on
                print(
                    f"cowork: line not sent: {type(exc).__name__} {exc}".rstrip(), file=sys.stderr
                )

    # --- outbound -> stdout --------------------------------------------------------------
    async def _print(self, js: Any, pull: Any) -> None:
        # The stop flag, not only the cancel, ends the loop: Python 3.11's wait_for
        # (inside nats-py's fetch) can drop a cancel that lands as its wait ends, and
        # a `while True` would then fetch forever while the exit waits on it.
        while not self.stop.is_set():
            try:
                batch = await pull.fetch(8, timeout=1)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in batch:
                await self._deliver(js, msg)

    async def _deliver(self, js: Any, msg: Any) -> None:
        try:
            delivery = decode(msg.data, ChannelOutbound).data
        except ContractError as exc:
            print(f"cowork: dropped a malformed delivery: {exc.reason}", file=sys.stderr)
            await msg.term()
            return
        attempts = max(1, msg.metadata.num_delivered or 1)
        if delivery.delivery_id in self.sent:
            await msg.ack()
            await self._receipt(js, delivery, DeliveryStatus.DUPLICATE, attempts)
            return
        try:
            result = await self.provider.send(delivery)
        except DeliveryFailed as exc:
            if exc.permanent or attempts >= MAX_ATTEMPTS:
                await msg.term()
                await self._receipt(
                    js,
                    delivery,
                    DeliveryStatus.DEAD_LETTERED,
                    attempts,
                    code=exc.code,
                    error=str(exc),
                )
            else:
                delay = exc.retry_after if exc.retry_after is not None else float(attempts)
                await msg.nak(delay=delay)
                await self._receipt(
                    js,
                    delivery,
                    DeliveryStatus.RETRYING,
                    attempts,
                    code=exc.code,
                    error=str(exc),
                    retry_after_seconds=delay,
                )
            return
        self.sent.add(delivery.delivery_id)
        await msg.ack()
        ids = [result.provider_message_id] if result.provider_message_id else []
        await self._receipt(
            js,
            delivery,
            DeliveryStatus.SENT,
            attempts,
            provider_message_id=result.provider_message_id,
            provider_message_ids=ids,
        )

    async def _receipt(
        self,
        js: Any,
        delivery: ChannelOutbound,
        status: DeliveryStatus,
        attempts: int,
        **fields: Any,
    ) -> None:
        receipt = ChannelReceipt(
            delivery_id=delivery.delivery_id,
            status=status,
            target=delivery.target,
            attempts=attempts,
            **fields,
        )
        envelope = Envelope.wrap(
            receipt, source=self.source, tenant=self.tenant, workspace=self.workspace
        )
        subject = subjects.CHANNEL_RECEIPT.build(tenant=self.tenant, instance_id=self.instance)
        try:
            await js.publish(
                subject,
                envelope.encode(),
                headers={"Nats-Msg-Id": f"rcpt-{delivery.delivery_id}-{status.value}-{attempts}"},
                timeout=5,
            )
        except Exception as exc:  # noqa: BLE001 - a lost receipt must not stop the terminal
            print(f"cowork: receipt not sent: {type(exc).__name__}", file=sys.stderr)
