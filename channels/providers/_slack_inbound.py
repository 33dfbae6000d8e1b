"""Slack inbound: request signing, Events API callbacks, interactivity payloads
and slash commands, as normalised channel messages."""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any
from urllib.parse import parse_qsl

from schemas import ChannelAttachment, ChannelInteraction, ChannelSender, ChannelTarget

from .._provider import (
    BadRequest,
    InstanceConfig,
    VerificationFailed,
    WebhookRequest,
    WebhookResult,
    check_timestamp,
)
from . import _payload as p

_MENTION_PREFIX = re.compile(r"^\s*<@[A-Z0-9]+>\s*")
_HANDLED_EVENTS = {"message", "app_mention"}
_HANDLED_SUBTYPES = {None, "file_share"}  # edits, joins, bot posts...: not prompts


def verify(request: WebhookRequest, signing_secret: str) -> None:
    timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
    signature = request.headers.get("X-Slack-Signature", "")
    check_timestamp(request.now, timestamp, "Slack")
    base = b"v0:" + timestamp.encode() + b":" + request.body
    expected = "v0=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise VerificationFailed("signature.invalid", "the Slack signature does not match")


class SlackInbound:
    def __init__(self, config: InstanceConfig, prompt_command: str) -> None:
        self.config = config
        self.prompt_command = prompt_command

    def parse(self, request: WebhookRequest) -> WebhookResult:
        content_type = request.headers.get("Content-Type", "").lower()
        if "json" in content_type or request.body.lstrip()[:1] == b"{":
            return self._event(request, p.json_object(request.body))
        form = _form(request.body)
        if "payload" in form:
            return self._interactivity(request, p.json_object(form["payload"], "payload"))
        if "command" in form:
            return self._slash_command(request, form)
        raise BadRequest("payload.unsupported", "not a Slack event, interaction or command")

    # --- Events API ----------------------------------------------------------------------
    def _event(self, request: WebhookRequest, data: dict[str, Any]) -> WebhookResult:
        kind = p.text(data, "type", required=True, max_length=64)
        if kind == "url_verification":
            challenge = p.text(data, "challenge", required=True, max_length=256)
            return WebhookResult(status=200, body=challenge.encode(), content_type="text/plain")
        if kind != "event_callback":
            return WebhookResult()  # app_rate_limited and other notices
        event_id = p.text(data, "event_id", required=True, max_length=256)
        event = p.obj(data, "event", required=True)
        if (
            p.text(event, "type") not in _HANDLED_EVENTS
            or event.get("bot_id") is not None
            or p.text(event, "subtype", max_length=64) not in _HANDLED_SUBTYPES
        ):
            return WebhookResult()  # not a person writing to us: nothing to do
        raw = p.text(event, "text") or ""
        text = _MENTION_PREFIX.sub("", raw) if event.get("type") == "app_mention" else raw
        user = p.ident(event, "user", required=True)
        ts = p.text(event, "ts", required=True, max_length=64)
        fields: dict[str, Any] = {"text": text, "raw_text": raw}
        command = p.split_command(text)
        if command is not None:
            name, _, args = command
            fields.update(is_command=True, command=name, command_args=args)
        message = p.inbound(
            self.config,
            request,
            event_type="message",
            provider_event_id=event_id,
            provider_message_id=ts,
            target=ChannelTarget(
                chat_id=p.ident(event, "channel", required=True),
                is_direct=p.text(event, "channel_type") == "im",
                thread_id=p.text(event, "thread_ts", max_length=64),
                user_id=user,
                message_id=ts,
            ),
            sender=ChannelSender(provider_user_id=user),
            attachments=_files(event),
            **fields,
        )
        return WebhookResult(messages=[message])

    # --- interactivity (button presses) ----------------------------------------------------
    def _interactivity(self, request: WebhookRequest, data: dict[str, Any]) -> WebhookResult:
        if p.text(data, "type") != "block_actions":
            return WebhookResult()  # view submissions, shortcuts: not used
        actions = [a for a in p.items(data, "actions") if isinstance(a, dict)]
        if not actions:
            raise BadRequest("payload.invalid", "a block_actions payload without actions")
        action = actions[0]
        token = p.text(action, "value", required=True, max_length=2000)
        user = p.obj(data, "user", required=True)
        user_id = p.ident(user, "id", required=True)
        channel = p.obj(data, "channel") or {}
        container = p.obj(data, "container") or {}
        message = p.obj(data, "message") or {}
        trigger = p.text(data, "trigger_id", max_length=256)
        event_id = trigger or "{}:{}".format(
            p.text(action, "action_ts", required=True, max_length=64), user_id
        )
        chat_id = p.ident(channel, "id") or p.ident(container, "channel_id", required=True)
        message_ts = p.text(container, "message_ts", max_length=64) or p.text(
            message, "ts", max_length=64
        )
        press = p.inbound(
            self.config,
            request,
            event_type="interaction",
            provider_event_id=event_id,
            provider_message_id=message_ts,
            target=ChannelTarget(
                chat_id=chat_id,
                is_direct=p.text(container, "channel_type") == "im" or chat_id.startswith("D"),
                thread_id=p.text(container, "thread_ts", max_length=64)
                or p.text(message, "thread_ts", max_length=64),
                user_id=user_id,
                message_id=message_ts,
            ),
            sender=ChannelSender(
                provider_user_id=user_id,
                username=p.text(user, "username", max_length=256),
                display_name=p.text(user, "name", max_length=512),
            ),
            interaction=ChannelInteraction(
                id=event_id,
                token=token,
                kind="button",
                response_token=p.text(data, "response_url", max_length=2048),
            ),
        )
        return WebhookResult(messages=[press])

    # --- slash commands ----------------------------------------------------------------------
    def _slash_command(self, request: WebhookRequest, form: dict[str, str]) -> WebhookResult:
        name = p.text(form, "command", required=True, max_length=64).lstrip("/").lower()
        args_text = p.text(form, "text") or ""
        trigger = p.text(form, "trigger_id", required=True, max_length=256)
        user_id = p.ident(form, "user_id", required=True)
        fields: dict[str, Any]
        if name == self.prompt_command:  # `/ask how do I ...` is a prompt
            fields = {"text": args_text, "raw_text": f"/{name} {args_text}".strip()}
        else:
            raw = f"/{name} {args_text}".strip()
            parsed = p.split_command(raw)
            if parsed is None:
                raise BadRequest("payload.invalid", "the slash command name is not valid")
            fields = {
                "text": raw,
                "raw_text": raw,
                "is_command": True,
                "command": parsed[0],
                "command_args": parsed[2],
            }
        chat_id = p.ident(form, "channel_id", required=True)
        message = p.inbound(
            self.config,
            request,
            event_type="command",
            provider_event_id=trigger,
            target=ChannelTarget(
                chat_id=chat_id,
                is_direct=form.get("channel_name") == "directmessage",
                user_id=user_id,
            ),
            sender=ChannelSender(
                provider_user_id=user_id, username=p.text(form, "user_name", max_length=256)
            ),
            interaction=ChannelInteraction(
                id=trigger,
                token=name,
                kind="command",
                response_token=p.text(form, "response_url", max_length=2048),
            ),
            **fields,
        )
        return WebhookResult(messages=[message])


def _form(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=True, max_num_fields=200
        )
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("payload.invalid", "the body is neither JSON nor a form") from None
    return dict(pairs)


def _files(event: dict[str, Any]) -> list[ChannelAttachment]:
    found = []
    for item in p.items(event, "files")[:50]:
        if not isinstance(item, dict):
            raise BadRequest("payload.invalid", "'files' must hold objects")
        size = p.integer(item, "size")
        found.append(
            ChannelAttachment(
                provider_file_id=p.ident(item, "id", required=True),
                filename=p.text(item, "name", max_length=512),
                mime_type=p.text(item, "mimetype", max_length=128),
                size_bytes=size if size is not None and size >= 0 else None,
            )
        )
    return found
