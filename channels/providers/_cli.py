"""CLI provider: a terminal as a channel, for local use and for trying things out.

It has no webhook: the `cowork channel cli` process (channels/cli/_command.py)
reads lines from stdin, hands each to parse() as a request with method
`STDIN`, and prints deliveries with send(). An HTTP request can never be
authentic for a CLI instance, so verify() refuses every one of them.

A line is either plain text or a JSON object
`{"text": ..., "id"?: ..., "user"?: ..., "interaction"?: {"id", "token"}}`
(how a terminal user presses one of the buttons printed with their tokens).
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import uuid
from typing import Any, ClassVar, Literal, TextIO

import httpx
from pydantic import Field

from schemas import (
    ChannelEventType,
    ChannelInteraction,
    ChannelOutbound,
    ChannelSender,
    ChannelTarget,
    DeliveryType,
)

from .._provider import (
    BadRequest,
    ButtonLimits,
    Capabilities,
    DeliveryFailed,
    InstanceConfig,
    ProviderSettings,
    SendResult,
    VerificationFailed,
    WebhookRequest,
    WebhookResult,
)
from ._payload import command_fields, contract_errors, inbound, json_object, obj, text

STDIN_METHOD = "STDIN"  # the method of a request built from a stdin line
CHAT_ID = "local"


class CliSettings(ProviderSettings):
    user: str | None = Field(default=None, min_length=1, max_length=256)
    output_format: Literal["text", "json"] = "text"
    # Where deliveries go when no stream is handed in: a file appended to (a
    # terminal's tty, a log another program tails); unset means stdout.
    output_path: str | None = Field(default=None, min_length=1, max_length=4096)


class CliSecrets(ProviderSettings):
    pass


def local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER (containers)
        return "local"


class CliProvider:
    kind: ClassVar[str] = "cli"
    capabilities: ClassVar[Capabilities] = Capabilities(
        threads=False,
        edit=True,
        buttons=ButtonLimits(max_count=10, max_rows=5, max_token_bytes=256),  # shown as text
        file_upload=False,
        file_download=False,
        typing=False,
        reactions=False,
        max_text_length=8192,
        parse_modes=frozenset({"plain", "markdown"}),
        max_file_bytes=0,
        interaction_ack="none",
        rate_limit="none",
        ephemeral=False,
        inbound="stdin",
        verification="local process only (stdin); every HTTP request is refused",
    )
    settings_model: ClassVar[type[ProviderSettings]] = CliSettings
    secrets_model: ClassVar[type[ProviderSettings]] = CliSecrets

    def __init__(
        self,
        config: InstanceConfig,
        http: httpx.AsyncClient | None = None,
        *,
        output: TextIO | None = None,
    ) -> None:
        self.config = config
        self.settings: CliSettings = config.settings
        self.output = output
        if self.output is None and self.settings.output_path is None:
            self.output = sys.stdout
        self.user = self.settings.user or local_user()
        self._sent = 0
        self._by_delivery: dict[str, str] = {}  # delivery id -> local message id, for edits

    # --- inbound ---------------------------------------------------------------------
    def handshake(self, request: WebhookRequest) -> WebhookResult | None:
        return None

    def verify(self, request: WebhookRequest) -> None:
        if request.method != STDIN_METHOD:
            raise VerificationFailed(
                "cli.no_webhook", "a CLI channel instance takes no webhook requests"
            )

    @contract_errors
    def parse(self, request: WebhookRequest) -> WebhookResult:
        try:
            line = request.body.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadRequest("cli.line_invalid", "the line is not UTF-8") from None
        if not line:
            raise BadRequest("cli.line_empty", "the line is empty")
        fields: dict[str, Any] = {"text": line}
        if line.startswith("{"):
            fields = json_object(line, "line")
        body = text(fields, "text") or ""
        event_id = text(fields, "id", max_length=256) or uuid.uuid4().hex
        user = text(fields, "user", max_length=256) or self.user
        pressed = obj(fields, "interaction")
        interaction = None
        if pressed is not None:
            interaction = ChannelInteraction(
                id=text(pressed, "id", max_length=256) or event_id,
                token=text(pressed, "token", required=True, max_length=2048) or "",
                kind="button",
            )
        elif not body.strip():
            raise BadRequest("cli.line_empty", "the line has no text")
        event_type = (
            ChannelEventType.INTERACTION if interaction else ChannelEventType.MESSAGE
        ).value
        message = inbound(
            self.config,
            request,
            event_type=event_type,
            provider_event_id=event_id,
            provider_message_id=event_id,
            **(command_fields(body) if not interaction else {}),
            target=ChannelTarget(
                chat_id=CHAT_ID, is_direct=True, user_id=user, message_id=event_id
            ),
            sender=ChannelSender(provider_user_id=user, username=user),
            text=body,
            raw_text=body,
            interaction=interaction,
        )
        return WebhookResult(messages=[message])

    # --- outbound --------------------------------------------------------------------
    async def send(self, delivery: ChannelOutbound) -> SendResult:
        self._check(delivery)
        if delivery.type == DeliveryType.EDIT:
            local = delivery.edit_message_id or self._by_delivery.get(
                delivery.edit_of_delivery_id or ""
            )
            if not local:
                raise DeliveryFailed(
                    "cli: the message to edit is unknown", code="delivery.invalid", permanent=True
                )
        else:
            self._sent += 1
            local = f"cli-{self._sent}"
            self._by_delivery[delivery.delivery_id] = local
        self._write(delivery, local)
        return SendResult(provider_message_id=local)

    def _check(self, delivery: ChannelOutbound) -> None:
        caps, problem = self.capabilities, None
        if delivery.type not in (DeliveryType.TEXT, DeliveryType.EDIT, DeliveryType.BUTTONS):
            problem = f"a terminal cannot {delivery.type.value}"
        elif len(delivery.text or "") > caps.max_text_length:
            problem = f"the text is longer than {caps.max_text_length}"
        elif (
            delivery.buttons
            and caps.buttons
            and (
                sum(len(row) for row in delivery.buttons) > caps.buttons.max_count
                or len(delivery.buttons) > caps.buttons.max_rows
                or any(
                    len(b.token.encode()) > caps.buttons.max_token_bytes
                    for row in delivery.buttons
                    for b in row
                )
            )
        ):
            problem = "the buttons exceed the declared limits"
        if problem:
            raise DeliveryFailed(f"cli: {problem}", code="delivery.invalid", permanent=True)

    def _write(self, delivery: ChannelOutbound, local: str) -> None:
        if self.settings.output_format == "json":
            record = delivery.model_dump(mode="json", by_alias=True, exclude_none=True)
            record["messageId"] = local
            line = json.dumps(record, separators=(",", ":"))
        else:
            line = readable(delivery, local)
        try:
            if self.output is None:
                with open(self._output_path(), "a", encoding="utf-8") as out:
                    out.write(line + "\n")
            else:
                self.output.write(line + "\n")
                self.output.flush()
        except (OSError, ValueError) as exc:  # closed pipe or stream, unwritable file
            raise DeliveryFailed(
                f"cli: cannot write the output ({type(exc).__name__})", code="transport.error"
            ) from None

    def _output_path(self) -> str:
        """The file deliveries are appended to when no stream was handed in."""
        path = self.settings.output_path
        if path is None:  # __init__ falls back to stdout when neither is given
            raise RuntimeError("the CLI provider has neither an output stream nor a path")
        return path

    async def probe(self) -> str:
        if self.output is None:
            path = self._output_path()
            if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
                raise DeliveryFailed(f"cli: cannot write to {path}", code="transport.error")
            return f"writing to {path}"
        if getattr(self.output, "closed", False):
            raise DeliveryFailed("cli: the output is closed", code="transport.error")
        return f"writing to {getattr(self.output, 'name', 'a stream')}"


def readable(delivery: ChannelOutbound, local: str) -> str:
    """A delivery as a person reads it in a terminal."""
    head = f"[{local}] " if delivery.type != DeliveryType.EDIT else f"[{local} edited] "
    lines = [head + (delivery.text or (delivery.file.filename if delivery.file else ""))]
    for row in delivery.buttons or []:
        lines.append("   " + "  ".join(f"[{b.label}: {b.token}]" for b in row))
    return "\n".join(lines)
