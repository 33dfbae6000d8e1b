"""Helpers for end-to-end tests of channel instances against fake chat platforms.

A test creates an instance through the admin API pointing at a fake platform
(tests/kits/fakeplatforms), gives the chat user a role the way a user gets one (a
claim code sent from the chat), posts the platform's signed requests to the
hub's public webhook route, and watches what the fake platform's chat shows.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import httpx
from desktopkit import TENANT, api, eventually

from channels import WebhookRequest

# Provider event ids must be unique per delivery (Telegram update_id, Slack
# event_id ...): the hub dedupes on them. Large, so no fake's defaults collide.
_event_ids = itertools.count(50_000)


def next_event_id() -> str:
    return str(next(_event_ids))


async def create_instance(
    http: httpx.AsyncClient,
    fake: Any,
    *,
    instance_id: str,
    workspace_id: str,
    authority: str = "desktop_paired",
    **extra: Any,
) -> dict:
    """A channel instance of `fake.kind` talking to `fake`, bound to `workspace_id`."""
    body = {
        "instanceId": instance_id,
        "kind": fake.kind,
        "workspaceId": workspace_id,
        "authority": authority,
        "settings": fake.instance_settings(),
        "secrets": fake.instance_secrets(),
        **extra,
    }
    return await api(
        http, "POST", f"/api/v1/tenants/{TENANT}/channel-instances", json=body, expect=(201,)
    )


async def instance_view(http: httpx.AsyncClient, instance_id: str) -> dict:
    return await api(http, "GET", f"/api/v1/tenants/{TENANT}/channel-instances/{instance_id}")


async def wait_ready(http: httpx.AsyncClient, instance_id: str, timeout: float = 15.0) -> dict:
    async def ready() -> dict | None:
        view = await instance_view(http, instance_id)
        return view if (view.get("health") or {}).get("state") == "ready" else None

    return await eventually(ready, timeout, 0.1, f"channel instance {instance_id} ready")


async def post_webhook(
    hub_url: str,
    instance_id: str,
    request: WebhookRequest,
) -> httpx.Response:
    """Send a fake platform's signed request to the hub's public webhook route, as
    the platform would (no admin bearer)."""
    headers = {
        k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
    }
    async with httpx.AsyncClient(base_url=hub_url, timeout=10) as platform:
        return await platform.request(
            request.method,
            f"/webhooks/{instance_id}",
            content=request.body,
            headers=headers,
            params=dict(request.query),
        )


async def send_text(
    hub_url: str,
    fake: Any,
    instance_id: str,
    text: str,
    *,
    chat_id: str,
    user_id: str,
    event_id: str | None = None,
) -> httpx.Response:
    request = fake.signed_message(
        text, chat_id=chat_id, user_id=user_id, event_id=event_id or next_event_id()
    )
    response = await post_webhook(hub_url, instance_id, request)
    assert response.status_code == 200, response.text
    return response


async def emit_text(
    fake: Any, text: str, *, chat_id: str, user_id: str, event_id: str | None = None
) -> None:
    """What `send_text` posts as a webhook, sent over the instance's outbound
    transport instead (a long poll's answer, a Gateway dispatch)."""
    await fake.emit(
        fake.signed_message(
            text, chat_id=chat_id, user_id=user_id, event_id=event_id or next_event_id()
        )
    )


async def users(http: httpx.AsyncClient, instance_id: str) -> list[dict]:
    page = await api(http, "GET", f"/api/v1/tenants/{TENANT}/channel-instances/{instance_id}/users")
    return page["users"]


def _user_id_of(view: dict) -> str:
    return str(view.get("providerUserId") or view.get("provider_user_id") or "")


async def claim_role(
    http: httpx.AsyncClient,
    hub_url: str,
    fake: Any,
    instance_id: str,
    *,
    chat_id: str,
    user_id: str,
    role: str,
    outbound: bool = False,
) -> None:
    """Promote a chat user the way a user is promoted: an admin creates a claim code,
    the user sends `/claim CODE` from the chat (over the outbound transport when
    `outbound`). Waits until the hub shows the role."""
    created = await api(
        http,
        "POST",
        f"/api/v1/tenants/{TENANT}/channel-claim-codes",
        json={"role": role, "instanceId": instance_id},
        expect=(201,),
    )
    claim = f"/claim {created['code']}"
    if outbound:
        await emit_text(fake, claim, chat_id=chat_id, user_id=user_id)
    else:
        await send_text(hub_url, fake, instance_id, claim, chat_id=chat_id, user_id=user_id)

    platform_user = fake.user_ref(user_id)  # as the platform names the user

    async def promoted() -> bool:
        return any(
            _user_id_of(u) == platform_user and u.get("role") == role
            for u in await users(http, instance_id)
        )

    await eventually(promoted, 15, 0.1, f"chat user {user_id} to become {role}")


async def wait_posted(
    fake: Any,
    chat_id: str,
    check: Callable[[Any], bool],
    *,
    timeout: float = 30.0,
    what: str = "a chat message",
) -> Any:
    """The first message of the fake's chat `chat_id` satisfying `check` (edits
    change a message in place, so this also waits for an edit)."""

    def found() -> Any:
        return next((p for p in fake.chats.get(chat_id, []) if check(p)), None)

    try:
        return await eventually(found, timeout, 0.05, f"{what} in chat {chat_id}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the chat shows:\n{chat_dump(fake, chat_id)}") from None


def chat_dump(fake: Any, chat_id: str) -> str:
    """The chat as text, for assertion messages."""
    return (
        "\n".join(
            f"[{p.message_id} edits={p.edits} buttons={p.buttons}] {p.text!r}"
            for p in fake.chats.get(chat_id, [])
        )
        or "(nothing)"
    )


def telegram_button_data(fake: Any, chat_id: str, label_contains: str) -> str:
    """The callback_data of the newest inline button whose label contains
    `label_contains`, from the sendMessage/editMessageText calls the fake got."""
    found = None
    for operation, body in fake.calls:
        if operation not in ("sendMessage", "editMessageText") or not isinstance(body, dict):
            continue
        if str(body.get("chat_id")) != chat_id:
            continue
        markup = body.get("reply_markup") or {}
        if isinstance(markup, str):
            markup = json.loads(markup)
        for row in markup.get("inline_keyboard") or []:
            for button in row:
                if label_contains.lower() in str(button.get("text", "")).lower():
                    found = button.get("callback_data")
    assert found, f"no {label_contains!r} button sent to chat {chat_id}: {fake.calls!r}"[:3000]
    return found
