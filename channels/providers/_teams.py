"""Microsoft Teams provider: a Bot Framework bot. Activities in (webhook, verified
as JWTs: channels/providers/_teams_auth.py), the connector API out.

https://learn.microsoft.com/azure/bot-service/rest-api/bot-framework-rest-connector-api-reference:
a reply is `POST {serviceUrl}/v3/conversations/{id}/activities`, an edit `PUT
…/activities/{activityId}`, typing an activity of type `typing`; calls carry a
client-credentials token of the bot's app. Approvals are Adaptive Cards whose
`Action.Submit` buttons send `{"token": ...}` back as the `value` of a message
activity. The signing keys (JWKS named by the Bot Framework's OpenID metadata)
are fetched by `probe()` and again, at most once a minute, when a token names a
key not yet known; `verify()` itself does no I/O.

The serviceUrl is the instance's setting (`serviceUrl`, Teams' regional
endpoint): replies go there, and an activity naming another one is refused, so
no inbound request chooses where the bot's token is sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import Field

from schemas import ChannelOutbound, DeliveryType

from .. import _ssrf
from .._provider import (
    ApiBaseSettings,
    BadRequest,
    ButtonLimits,
    Capabilities,
    DeliveryFailed,
    InstanceConfig,
    ProviderSettings,
    SendResult,
    WebhookRequest,
    WebhookResult,
)
from . import _payload as p
from ._platform_http import call_json, check_buttons, require_object, require_text, unsupported
from ._teams_auth import rsa_keys, verify_token

log = logging.getLogger("cowork.channels")
LOGIN = "https://login.botframework.com"
TOKENS = "https://login.microsoftonline.com"
SERVICE = "https://smba.trafficmanager.net/teams"
SCOPE = "https://api.botframework.com/.default"
MAX_TEXT = 16000
KEY_REFRESH_SECONDS = 60.0
_MENTION = re.compile(r"<at>[^<]{0,200}</at>\s*")


class TeamsSettings(ApiBaseSettings):
    # apiBase (tests, proxies) replaces the three Microsoft hosts: the OpenID
    # metadata, the token endpoint and the connector.
    app_id: str = Field(pattern=r"^[0-9a-fA-F-]{36}$")  # the bot's Microsoft App ID (audience)
    service_url: str | None = Field(default=None, max_length=512)


class TeamsSecrets(ProviderSettings):
    app_password: str = Field(min_length=1, max_length=512, repr=False)


class TeamsProvider:
    kind: ClassVar[str] = "teams"
    capabilities: ClassVar[Capabilities] = Capabilities(
        threads=False,
        edit=True,
        buttons=ButtonLimits(10, 5, 256),
        file_upload=False,
        file_download=False,
        typing=True,
        reactions=False,
        max_text_length=MAX_TEXT,
        parse_modes=frozenset({"plain", "markdown"}),
        max_file_bytes=0,
        interaction_ack="none",
        rate_limit="retry_after",
        ephemeral=False,
        verification="Authorization: Bearer JWT (RS256) signed by a key the Bot Framework "
        "publishes; issuer, audience (app id), expiry with 5 min skew, serviceurl",
    )
    settings_model: ClassVar[type[ProviderSettings]] = TeamsSettings
    secrets_model: ClassVar[type[ProviderSettings]] = TeamsSecrets
    resolve: ClassVar[_ssrf.Resolver | None] = None

    def __init__(self, config: InstanceConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.settings: TeamsSettings = config.settings
        self.secrets: TeamsSecrets = config.secrets
        self.http = http
        base = (self.settings.api_base or "").rstrip("/")
        self._login, self._tokens = base or LOGIN, base or TOKENS
        self.service_url = self.settings.service_url or (base + "/teams" if base else SERVICE)
        self.service_url = self.service_url.rstrip("/")
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._keys_at = 0.0
        self._refreshing: asyncio.Task | None = None
        self._token: tuple[str, float] | None = None  # (access token, expires at)

    # --- inbound -----------------------------------------------------------------------------
    def handshake(self, request: WebhookRequest) -> WebhookResult | None:
        return None

    def verify(self, request: WebhookRequest) -> None:
        try:
            activity = p.json_object(request.body, "activity")
            service_url = p.text(activity, "serviceUrl", max_length=512)
        except BadRequest:
            service_url = None
        try:
            verify_token(
                request.headers.get("Authorization", ""),
                self._keys,
                audience=self.settings.app_id,
                service_url=service_url,
                now=request.now,
            )
        except Exception as exc:
            if getattr(exc, "code", "") == "signature.unknown_key":
                self._refresh_soon()  # keys rotate: a new one may have been published
            raise

    def _refresh_soon(self) -> None:
        if time.monotonic() - self._keys_at < KEY_REFRESH_SECONDS:
            return
        if self._refreshing is None or self._refreshing.done():
            self._keys_at = time.monotonic()
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh_keys()
        except Exception as exc:  # the next unknown key tries again (a minute on)
            log.warning("channel.teams.keys_failed", extra={"fields": {"error": str(exc)}})

    @p.contract_errors
    def parse(self, request: WebhookRequest) -> WebhookResult:
        activity = p.json_object(request.body, "activity")
        if p.text(activity, "type") != "message":
            return WebhookResult()  # conversationUpdate and the rest: acknowledged
        service_url = (p.text(activity, "serviceUrl", max_length=512) or "").rstrip("/")
        if service_url != self.service_url:
            raise BadRequest(
                "payload.invalid", "the activity's serviceUrl is not this instance's serviceUrl"
            )
        conversation = p.obj(activity, "conversation", required=True)
        sender = p.obj(activity, "from", required=True)
        user_id = p.text(sender, "id", required=True, max_length=256)
        activity_id = p.text(activity, "id", required=True, max_length=256)
        target = {
            "chat_id": p.text(conversation, "id", required=True, max_length=512),
            "is_direct": p.text(conversation, "conversationType") == "personal",
            "user_id": user_id,
            "message_id": p.text(activity, "replyToId", max_length=256) or activity_id,
        }
        who = {"provider_user_id": user_id, "display_name": p.text(sender, "name", max_length=512)}
        value = p.obj(activity, "value")
        if value is not None and "token" in value:  # an Adaptive Card's Action.Submit
            token = p.text(value, "token", required=True, max_length=256)
            return WebhookResult(
                messages=[
                    p.inbound(
                        self.config,
                        request,
                        event_type="interaction",
                        provider_event_id=activity_id,
                        target=target,
                        sender=who,
                        interaction={"id": activity_id, "token": token, "kind": "button"},
                    )
                ]
            )
        raw = _MENTION.sub("", p.text(activity, "text", max_length=16384) or "").strip()
        if not raw:
            return WebhookResult()
        message = p.inbound(
            self.config,
            request,
            event_type="message",
            provider_event_id=activity_id,
            provider_message_id=activity_id,
            target={**target, "message_id": activity_id},
            sender=who,
            text=raw,
            raw_text=raw,
            **p.command_fields(raw),
        )
        return WebhookResult(messages=[message])

    # --- keys and tokens ---------------------------------------------------------------------
    async def refresh_keys(self) -> None:
        """The signing keys the Bot Framework publishes (its OpenID metadata's JWKS)."""
        metadata = await self._get(f"{self._login}/v1/.well-known/openidconfiguration", "metadata")
        jwks_uri = metadata.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(self._login + "/"):
            raise DeliveryFailed(
                "teams openid metadata: the jwks_uri is not on the login host",
                code="platform.bad_response",
            )
        keys = rsa_keys(await self._get(jwks_uri, "signing keys"))
        if not keys:
            raise DeliveryFailed("teams: no signing keys published", code="platform.bad_response")
        self._keys, self._keys_at = keys, time.monotonic()

    async def _get(self, url: str, what: str) -> dict[str, Any]:
        _, body = await call_json(
            self.http,
            "GET",
            url,
            operation=f"teams {what}",
            pin=self.settings.api_policy,
            resolve=type(self).resolve,
        )
        return require_object(f"teams {what}", body)

    async def _access_token(self) -> str:
        if self._token is not None and self._token[1] > time.monotonic() + 60:
            return self._token[0]
        _, body = await call_json(
            self.http,
            "POST",
            f"{self._tokens}/botframework.com/oauth2/v2.0/token",
            operation="teams token",
            data={
                "grant_type": "client_credentials",
                "client_id": self.settings.app_id,
                "client_secret": self.secrets.app_password,
                "scope": SCOPE,
            },
            pin=self.settings.api_policy,
            resolve=type(self).resolve,
        )
        body = require_object("teams token", body)
        token, expires = body.get("access_token"), body.get("expires_in")
        if not isinstance(token, str) or not isinstance(expires, int):
            raise DeliveryFailed("teams token: no access token", code="platform.bad_response")
        self._token = (token, time.monotonic() + expires)
        return token

    # --- the connector -----------------------------------------------------------------------
    async def _connector(self, method: str, path: str, operation: str, activity: dict) -> Any:
        token = await self._access_token()
        _, body = await call_json(
            self.http,
            method,
            f"{self.service_url}/v3/conversations/{path}",
            operation=f"teams {operation}",
            json=activity,
            headers={"Authorization": f"Bearer {token}"},
            pin=self.settings.api_policy,
            resolve=type(self).resolve,
        )
        return body

    def _activity(self, delivery: ChannelOutbound, text: str) -> dict[str, Any]:
        markdown = delivery.parse_mode == "markdown"
        activity: dict[str, Any] = {
            "type": "message",
            "text": text,
            "textFormat": "markdown" if markdown else "plain",
        }
        rows = check_buttons(delivery, self.capabilities.buttons)
        if rows:  # an Adaptive Card: the text, then one ActionSet per row of buttons
            body: list[dict[str, Any]] = [{"type": "TextBlock", "text": text, "wrap": True}]
            for row in rows:
                actions = [
                    {
                        "type": "Action.Submit",
                        "title": button.label,
                        "style": "destructive" if button.style == "danger" else "default",
                        "data": {"token": button.token},
                    }
                    for button in row
                ]
                body.append({"type": "ActionSet", "actions": actions})
            card = {"type": "AdaptiveCard", "version": "1.4", "body": body}
            activity["attachments"] = [
                {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
            ]
        return activity

    async def send(self, delivery: ChannelOutbound) -> SendResult:
        conversation = quote(delivery.target.chat_id, safe="")
        kind = delivery.type
        if kind in (DeliveryType.TEXT, DeliveryType.BUTTONS):
            activity = self._activity(delivery, require_text(delivery, MAX_TEXT))
            if delivery.reply_to_message_id:
                activity["replyToId"] = delivery.reply_to_message_id
            body = await self._connector("POST", f"{conversation}/activities", "send", activity)
            sent = body.get("id") if isinstance(body, dict) else None
            if not isinstance(sent, str):
                raise DeliveryFailed("teams send: no activity id", code="platform.bad_response")
            return SendResult(sent)
        if kind == DeliveryType.EDIT:
            if not delivery.edit_message_id:
                raise DeliveryFailed(
                    "an edit needs the Teams activity id", code="delivery.invalid", permanent=True
                )
            activity = self._activity(delivery, require_text(delivery, MAX_TEXT))
            activity["id"] = delivery.edit_message_id
            target = f"{conversation}/activities/{quote(delivery.edit_message_id, safe='')}"
            await self._connector("PUT", target, "update", activity)
            return SendResult(delivery.edit_message_id)
        if kind == DeliveryType.TYPING:
            await self._connector(
                "POST", f"{conversation}/activities", "typing", {"type": "typing"}
            )
            return SendResult()
        raise unsupported("teams", f"{kind} deliveries")

    async def probe(self) -> str:
        await self._access_token()
        await self.refresh_keys()
        return f"teams bot {self.settings.app_id} ({len(self._keys)} signing keys)"
