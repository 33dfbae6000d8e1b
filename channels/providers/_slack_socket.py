"""Slack inbound over Socket Mode: the app dials a websocket instead of receiving
Events API, interactivity and slash-command POSTs.

https://api.slack.com/apis/socket-mode: `apps.connections.open` (app-level
token) gives a one-use URL; Slack says `hello`, then sends envelopes
`{envelope_id, type: events_api | interactive | slash_commands, payload}`,
each to be acknowledged with `{envelope_id}`; one not acknowledged is sent
again (`retry_attempt`), on this connection or the next. So an envelope is
acknowledged only after its messages are stored: a cut in between redelivers
it, and its event id makes it the same message. `disconnect` (a refresh, every
few hours) asks for a new connection. The payloads are exactly the webhook
bodies, parsed by the provider's webhook parser. No cursor: Slack keeps what
is unacknowledged.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar
from urllib.parse import urlencode

import httpx

from .._provider import ChannelError, WebhookResult
from .._transport import TransportSink, transport_request
from ._slack import SlackProvider
from ._websocket import receive_json, websocket

_FORM = "application/x-www-form-urlencoded"
HELLO_TIMEOUT = 10.0


class SlackSocketMode:
    name: ClassVar[str] = "slack-socket-mode"

    def __init__(self, provider: Any, http: httpx.AsyncClient) -> None:
        self.provider: SlackProvider = provider

    async def run(self, sink: TransportSink) -> None:
        url = await self.provider.open_socket()
        async with websocket(url, "slack socket mode") as ws:
            first = await receive_json(ws, HELLO_TIMEOUT)
            if first is None or first.get("type") != "hello":
                return  # closed or not Slack: reconnect with a new URL
            sink.report("socket mode connected", connected=True)
            while True:
                envelope = await receive_json(ws)
                if envelope is None:
                    return
                kind = envelope.get("type")
                if kind == "disconnect":
                    sink.report(f"slack asked to reconnect ({envelope.get('reason', '?')})")
                    return
                envelope_id = envelope.get("envelope_id")
                if not isinstance(envelope_id, str) or not envelope_id:
                    continue  # nothing to acknowledge: not an envelope
                result = self._parse(sink, kind, envelope.get("payload"))
                if result is not None:
                    await sink.accept(result, None)
                await ws.send_json({"envelope_id": envelope_id})

    def _parse(self, sink: TransportSink, kind: Any, payload: Any) -> WebhookResult | None:
        """The envelope's payload as the webhook body it stands for, parsed; None
        (acknowledged and skipped) when it is not something for a workspace."""
        if not isinstance(payload, dict):
            sink.refused(f"slack {kind}: no payload")
            return None
        if kind == "events_api":
            body, content_type = json.dumps(payload).encode(), "application/json"
        elif kind == "interactive":
            body, content_type = urlencode({"payload": json.dumps(payload)}).encode(), _FORM
        elif kind == "slash_commands":
            fields = {k: v for k, v in payload.items() if isinstance(v, str)}
            body, content_type = urlencode(fields).encode(), _FORM
        else:
            return None
        if len(body) > sink.body_limit:
            sink.refused(f"slack {kind}: larger than the body limit")
            return None
        try:
            return self.provider.parse(transport_request(body, content_type))
        except ChannelError as exc:
            sink.refused(f"slack {kind}: {exc.message}")
            return None
