"""Slack provider: Events API, interactivity and slash commands in (see
_slack_inbound.py), Web API methods out.

Slack answers most API errors with HTTP 200 and `{"ok": false, "error": ...}`;
those are mapped to retryable or permanent failures here. Interactions are
acknowledged by the webhook's HTTP 200; the interaction's `response_url` is
never called (it is a URL from a request body: calling it would be an SSRF
vector), so `interaction_ack` is "none".
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
from pydantic import Field

from schemas import ChannelOutbound, DeliveryType

from .. import _ssrf
from .._chunking import chunk_text
from .._provider import (
    ApiBaseSettings,
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
from .._transport import TransportSettings
from . import _payload as p
from ._platform_http import (
    call_json,
    check_buttons,
    checked_socket_url,
    file_bytes,
    invalid,
    require_object,
    require_reaction,
    require_text,
    unsupported,
)
from ._slack_inbound import SlackInbound, verify

DEFAULT_API_BASE = "https://slack.com/api"
_BLOCK_TEXT_LIMIT = 3000
_RETRYABLE = {
    "ratelimited",
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
    "team_added_to_org",
}
_STYLES = {"success": "primary", "danger": "danger"}
# reactions.add takes an emoji *name*; the emoji the hub uses, by name (U+FE0F, the
# emoji presentation selector, is dropped before the lookup).
REACTION_NAMES = {
    "👀": "eyes",
    "👍": "+1",
    "👎": "-1",
    "✅": "white_check_mark",
    "❌": "x",
    "⏳": "hourglass_flowing_sand",
    "🎉": "tada",
    "❤": "heart",
    "🔥": "fire",
    "🙏": "pray",
    "🤔": "thinking_face",
    "⚠": "warning",
}


class SlackSettings(ApiBaseSettings, TransportSettings):  # apiBase None: the real API
    DEFAULT_API_BASE: ClassVar[str | None] = DEFAULT_API_BASE
    prompt_command: str = Field(default="ask", pattern=r"^[a-z0-9_-]{1,32}$")


class SlackSecrets(ProviderSettings):
    WEBHOOK_SECRETS: ClassVar[tuple[str, ...]] = ("signing_secret",)
    bot_token: str = Field(min_length=1, max_length=512, repr=False)
    # Slack's: 32 hex. None: the instance uses Socket Mode and refuses every webhook.
    signing_secret: str | None = Field(default=None, min_length=16, max_length=256, repr=False)
    # The app-level token (`xapp-`, scope connections:write) Socket Mode connects with.
    app_token: str | None = Field(default=None, min_length=1, max_length=512, repr=False)


class SlackProvider:
    kind: ClassVar[str] = "slack"
    capabilities: ClassVar[Capabilities] = Capabilities(
        threads=True,
        edit=True,
        buttons=ButtonLimits(10, 5, 2000),
        file_upload=True,
        file_download=False,
        typing=False,
        reactions=True,
        max_text_length=4000,
        parse_modes=frozenset({"plain", "markdown"}),
        max_file_bytes=1024 * 1024 * 1024,
        interaction_ack="none",
        rate_limit="retry_after",
        ephemeral=False,
        verification="X-Slack-Signature v0 HMAC-SHA256 of v0:{timestamp}:{body}, "
        "timestamps within 5 minutes",
    )
    # Slack truncates at 40,000 characters but recommends staying under 4,000 (and
    # the contract's text is at most 16,384): 4,000 keeps streamed edits readable.
    settings_model: ClassVar[type[ProviderSettings]] = SlackSettings
    secrets_model: ClassVar[type[ProviderSettings]] = SlackSecrets
    # Replaced in tests to answer DNS for made-up names; None means the system resolver
    # (used only for an operator-set apiBase, whose calls are resolved and pinned).
    resolve: ClassVar[_ssrf.Resolver | None] = None

    def __init__(self, config: InstanceConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.settings: SlackSettings = config.settings
        self.secrets: SlackSecrets = config.secrets
        self.http = http
        self._api = (self.settings.api_base or DEFAULT_API_BASE).rstrip("/")
        self._inbound = SlackInbound(config, self.settings.prompt_command)

    # --- inbound -----------------------------------------------------------------------
    def handshake(self, request: WebhookRequest) -> WebhookResult | None:
        return None

    def verify(self, request: WebhookRequest) -> None:
        if self.secrets.signing_secret is None:
            raise VerificationFailed(
                "signature.invalid", "this Slack instance has no signing secret"
            )
        verify(request, self.secrets.signing_secret)

    async def open_socket(self) -> str:
        """A Socket Mode URL: `apps.connections.open` with the app-level token
        (https://api.slack.com/apis/socket-mode)."""
        if not self.secrets.app_token:
            raise DeliveryFailed(
                "slack socket mode needs the app-level token (secret appToken)",
                code="slack.no_app_token",
                permanent=True,
            )
        answer = await self._call("apps.connections.open", {}, token=self.secrets.app_token)
        return checked_socket_url(answer.get("url"), self.settings.api_policy, "slack socket mode")

    @p.contract_errors
    def parse(self, request: WebhookRequest) -> WebhookResult:
        return self._inbound.parse(request)

    # --- outbound ----------------------------------------------------------------------
    async def _call(
        self, method: str, payload: dict[str, Any], *, form: bool = False, token: str | None = None
    ) -> dict:
        operation = f"slack {method}"
        headers = {"Authorization": f"Bearer {token or self.secrets.bot_token}"}
        _, body = await call_json(
            self.http,
            "POST",
            f"{self._api}/{method}",
            operation=operation,
            headers=headers,
            data=payload if form else None,
            json=None if form else payload,
            pin=self.settings.api_policy,
            resolve=type(self).resolve,
        )
        body = require_object(operation, body)
        if body.get("ok") is not True:
            raw_error = body.get("error")
            error = raw_error if isinstance(raw_error, str) else "unknown"
            retryable = error in _RETRYABLE
            raise DeliveryFailed(
                f"{operation}: {error[:100]}",
                code="rate_limited" if error == "ratelimited" else f"slack.{error[:60]}",
                permanent=not retryable,
            )
        return body

    def _blocks(self, delivery: ChannelOutbound, text: str) -> list[dict[str, Any]] | None:
        rows = check_buttons(delivery, self.capabilities.buttons)
        if not rows:
            return None
        kind = "plain_text" if delivery.parse_mode == "plain" else "mrkdwn"
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": kind, "text": part}}
            for part in chunk_text(text, _BLOCK_TEXT_LIMIT)
        ]
        for r, row in enumerate(rows):
            elements = []
            for c, button in enumerate(row):
                element = {
                    "type": "button",
                    "action_id": f"cw-{r}-{c}",
                    "value": button.token,
                    "text": {"type": "plain_text", "text": button.label[:75]},
                }
                if button.style in _STYLES:
                    element["style"] = _STYLES[button.style]
                elements.append(element)
            blocks.append({"type": "actions", "elements": elements})
        return blocks

    async def send(self, delivery: ChannelOutbound) -> SendResult:
        target = delivery.target
        kind = delivery.type
        limit = self.capabilities.max_text_length
        if kind in (DeliveryType.TEXT, DeliveryType.BUTTONS):
            text = require_text(delivery, limit)
            payload: dict[str, Any] = {
                "channel": target.chat_id,
                "text": text,
                "mrkdwn": delivery.parse_mode != "plain",
            }
            if target.thread_id:
                payload["thread_ts"] = target.thread_id
            blocks = self._blocks(delivery, text)
            if blocks is not None:
                payload["blocks"] = blocks
            body = await self._call("chat.postMessage", payload)
            return SendResult(_ts(body))
        if kind == DeliveryType.EDIT:
            if not delivery.edit_message_id:
                raise invalid("an edit needs the Slack message ts")
            text = require_text(delivery, limit)
            # An edit without buttons clears earlier ones (an answered approval).
            payload = {
                "channel": target.chat_id,
                "ts": delivery.edit_message_id,
                "text": text,
                "blocks": self._blocks(delivery, text) or [],
            }
            await self._call("chat.update", payload)
            return SendResult(delivery.edit_message_id)
        if kind == DeliveryType.FILE:
            return await self._upload(delivery)
        if kind == DeliveryType.REACTION:
            return await self._react(delivery)
        if kind == DeliveryType.TYPING:
            raise unsupported("slack", "typing indicators (no Web API method)")
        if kind == DeliveryType.ANSWER_INTERACTION:
            raise unsupported(
                "slack",
                "answering interactions (acknowledged by the webhook "
                "answer; response_url is never called)",
            )
        raise unsupported("slack", f"{kind} deliveries")

    async def _react(self, delivery: ChannelOutbound) -> SendResult:
        """reactions.add on the message whose ts the target names (needs the
        reactions:write scope); reacting twice is not a failure."""
        emoji, ts = require_reaction(delivery)
        name = REACTION_NAMES.get(emoji.replace("\ufe0f", ""))
        if name is None:
            raise invalid(f"slack: no emoji name known for {emoji!r}")
        try:
            await self._call(
                "reactions.add", {"channel": delivery.target.chat_id, "timestamp": ts, "name": name}
            )
        except DeliveryFailed as exc:
            if exc.code != "slack.already_reacted":
                raise
        return SendResult()

    async def _upload(self, delivery: ChannelOutbound) -> SendResult:
        """files.uploadV2's three steps: get an upload URL, upload, complete."""
        file, content = file_bytes(delivery, self.capabilities.max_file_bytes)
        ticket = await self._call(
            "files.getUploadURLExternal",
            {"filename": file.filename, "length": str(len(content))},
            form=True,
        )
        upload_url, file_id = ticket.get("upload_url"), ticket.get("file_id")
        if not isinstance(upload_url, str) or not isinstance(file_id, str):
            raise DeliveryFailed(
                "slack files.getUploadURLExternal: incomplete answer", code="platform.bad_response"
            )
        self._check_upload_url(upload_url)
        await call_json(
            self.http,
            "POST",
            upload_url,
            operation="slack file upload",
            files={"file": (file.filename, content, file.mime_type)},
            # Under an operator-set apiBase the upload URL (Slack's answer) is
            # resolved, checked and pinned like every other call.
            pin=self.settings.api_policy,
            resolve=type(self).resolve,
        )
        complete: dict[str, Any] = {
            "files": [{"id": file_id, "title": file.filename}],
            "channel_id": delivery.target.chat_id,
        }
        if delivery.target.thread_id:
            complete["thread_ts"] = delivery.target.thread_id
        if delivery.text:
            complete["initial_comment"] = delivery.text[: self.capabilities.max_text_length]
        await self._call("files.completeUploadExternal", complete)
        return SendResult(file_id)

    def _check_upload_url(self, url: str) -> None:
        """The upload URL comes from Slack's answer: only Slack's own HTTPS hosts (or
        the configured API origin, for proxies and tests) are called with file bytes."""
        parts, api = urlsplit(url), urlsplit(self._api)
        host = (parts.hostname or "").lower()
        slack = parts.scheme == "https" and (host == "slack.com" or host.endswith(".slack.com"))
        same_origin = (parts.scheme, parts.netloc) == (api.scheme, api.netloc)
        if not (slack or same_origin) or parts.username or parts.password:
            raise DeliveryFailed(
                "slack returned an upload URL outside Slack",
                code="platform.bad_response",
                permanent=True,
            )

    async def probe(self) -> str:
        body = await self._call("auth.test", {})
        return f"slack team {body.get('team', '?')} as {body.get('user', '?')}"


def _ts(body: dict[str, Any]) -> str:
    ts = body.get("ts")
    if not isinstance(ts, str) or not ts:
        raise DeliveryFailed(
            "slack chat.postMessage: the answer has no ts", code="platform.bad_response"
        )
    return ts
