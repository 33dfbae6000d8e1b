"""Signal inbound: polling the signal-cli daemon's JSON-RPC `receive` (manual
receive mode). signal-cli takes a message off the Signal servers when it
receives it, so there is no cursor: what `receive` answered is stored at once,
in order; the dedupe id of each (`<author>:<timestamp>`) makes one message of
what signal-cli may hand over twice."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import httpx

from .._provider import ChannelError, WebhookResult
from .._transport import TransportSink, transport_request
from ._signal import SignalProvider


class SignalReceive:
    name: ClassVar[str] = "signal-jsonrpc"

    def __init__(self, provider: Any, http: httpx.AsyncClient) -> None:
        self.provider: SignalProvider = provider

    async def run(self, sink: TransportSink) -> None:
        sink.report("receiving from signal-cli", connected=True)
        while True:
            envelopes = await self.provider.receive(self.provider.settings.poll_timeout_seconds)
            result = WebhookResult()
            for envelope in envelopes:
                body = json.dumps(envelope).encode()
                if len(body) > sink.body_limit:
                    sink.refused("signal envelope: larger than the body limit")
                    continue
                try:
                    result.messages.extend(self.provider.parse(transport_request(body)).messages)
                except ChannelError as exc:
                    sink.refused(f"signal envelope: {exc.message}")
            await sink.accept(result, None)
