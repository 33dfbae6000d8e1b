"""A fake Bot Framework: the OpenID metadata and JWKS the bot's inbound tokens are
checked against, the client-credentials token endpoint, and the connector API
(`POST/PUT /teams/v3/conversations/{id}/activities[/{activityId}]`). It signs
activities as the Bot Framework does: an RS256 JWT (`kid` of a published key,
`iss` https://api.botframework.com, `aud` the app id, `exp`/`nbf`, `serviceurl`)
in `Authorization: Bearer`, and can sign with an unpublished key, for another
audience, or expired."""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import time
import uuid
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from channels import WebhookRequest

from ._base import FakePlatform, webhook_request


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class FakeTeams(FakePlatform):
    kind = "teams"
    authenticates_api = True
    signs_body = False  # the token proves the sender, not the body (TLS carries it)

    def __init__(self) -> None:
        super().__init__()
        self.app_id = str(uuid.uuid4())
        self.app_password = secrets.token_urlsafe(24)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "kid-" + secrets.token_hex(4)
        self.unpublished = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._tokens: set[str] = set()
        self.activities: dict[str, dict[str, Any]] = {}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/.well-known/openidconfiguration", self._metadata),
            web.get("/v1/.well-known/keys", self._keys),
            web.post("/botframework.com/oauth2/v2.0/token", self._token),
            web.post("/teams/v3/conversations/{conversation}/activities", self._post),
            web.put("/teams/v3/conversations/{conversation}/activities/{activity}", self._put),
        ]

    def instance_settings(self) -> dict[str, Any]:
        return {"apiBase": self.base_url, "allowLoopbackHttp": True, "appId": self.app_id}

    def instance_secrets(self) -> dict[str, str]:
        return {"appPassword": self.app_password}

    def chat_ref(self, chat_id: str) -> str:
        return f"19:chat{chat_id}@thread.tacv2"

    def user_ref(self, user_id: str) -> str:
        return f"29:user{user_id}"

    def event_ref(self, event_id: str) -> str:
        return f"act{event_id}"

    # --- the Bot Framework's endpoints --------------------------------------------------------
    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": "https://api.botframework.com",
                "jwks_uri": f"{self.base_url}/v1/.well-known/keys",
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def _keys(self, request: web.Request) -> web.Response:
        numbers = self.key.public_key().public_numbers()
        jwk = {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "n": _b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": _b64(numbers.e.to_bytes(3, "big")),
            "endorsements": ["msteams"],
        }
        return web.json_response({"keys": [jwk]})

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("client_id") != self.app_id or not hmac.compare_digest(
            str(form.get("client_secret", "")), self.app_password
        ):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = secrets.token_urlsafe(32)
        self._tokens.add(token)
        return web.json_response(
            {"token_type": "Bearer", "expires_in": 3600, "access_token": token}
        )

    async def _guard(self, request: web.Request, operation: str) -> tuple[Any, web.Response | None]:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self._tokens:
            return None, web.json_response({"error": {"code": "Unauthorized"}}, status=401)
        body = await request.json()
        self.calls.append((operation, body))
        failure = self.injected()
        if failure is None:
            return body, None
        headers = {"Retry-After": str(int(failure.retry_after))} if failure.retry_after else {}
        error = {"error": {"code": "Throttled" if failure.status == 429 else "BadArgument"}}
        return body, web.json_response(error, status=failure.status, headers=headers)

    def _buttons(self, activity: dict[str, Any]) -> list[list[str]]:
        rows = []
        for attachment in activity.get("attachments") or []:
            for element in attachment["content"]["body"]:
                if element["type"] == "ActionSet":
                    rows.append([action["title"] for action in element["actions"]])
        return rows

    async def _post(self, request: web.Request) -> web.Response:
        activity, refused = await self._guard(request, "send")
        if refused:
            return refused
        chat = request.match_info["conversation"]
        if activity.get("type") == "typing":
            self.typing.append(chat)
            return web.json_response({"id": self.new_message_id()})
        if not activity.get("text"):
            return web.json_response({"error": {"code": "BadArgument"}}, status=400)
        posted = self.post(chat, activity["text"], buttons=self._buttons(activity))
        return web.json_response({"id": posted.message_id})

    async def _put(self, request: web.Request) -> web.Response:
        activity, refused = await self._guard(request, "update")
        if refused:
            return refused
        posted = self.edit(
            request.match_info["conversation"], request.match_info["activity"], activity["text"]
        )
        if posted is None:
            return web.json_response({"error": {"code": "ActivityNotFound"}}, status=404)
        posted.buttons = self._buttons(activity)
        return web.json_response({"id": posted.message_id})

    # --- activities the Bot Framework would send us -------------------------------------------
    def token(
        self,
        *,
        key: rsa.RSAPrivateKey | None = None,
        audience: str | None = None,
        expires_in: float = 3600,
        service_url: str | None = None,
    ) -> str:
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        now = time.time()
        claims = {
            "iss": "https://api.botframework.com",
            "aud": audience or self.app_id,
            "nbf": int(now - 60),
            "exp": int(now + expires_in),
            "serviceurl": service_url or f"{self.base_url}/teams",
        }
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = (key or self.key).sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{_b64(signature)}"

    def signed_activity(self, activity: dict[str, Any], **token: Any) -> WebhookRequest:
        return webhook_request(
            json.dumps(activity).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {self.token(**token)}"},
        )

    def _activity(self, event_id: str, chat_id: str, user_id: str, **fields: Any) -> dict:
        return {
            "type": "message",
            "id": self.event_ref(event_id),
            "timestamp": "2026-12-06T06:00:00Z",
            "serviceUrl": f"{self.base_url}/teams",
            "channelId": "msteams",
            "from": {"id": self.user_ref(user_id), "name": "Ada"},
            "conversation": {
                "id": self.chat_ref(chat_id),
                "conversationType": "personal" if chat_id == user_id else "channel",
            },
            "recipient": {"id": f"28:{self.app_id}", "name": "cowork"},
            **fields,
        }

    def signed_message(
        self,
        text: str,
        *,
        chat_id: str = "100",
        user_id: str = "7",
        event_id: str = "1",
        thread_id: str | None = None,
    ) -> WebhookRequest:
        mention = "<at>cowork</at> " if chat_id != user_id else ""
        return self.signed_activity(
            self._activity(event_id, chat_id, user_id, text=mention + text, textFormat="plain")
        )

    def signed_button_press(
        self, token: str, *, chat_id: str = "100", user_id: str = "7", event_id: str = "2"
    ) -> WebhookRequest:
        return self.signed_activity(
            self._activity(event_id, chat_id, user_id, value={"token": token}, replyToId="900")
        )
