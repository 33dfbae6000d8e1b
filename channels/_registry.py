"""Every provider, by kind: the one place a new provider is added."""

from __future__ import annotations

from typing import Any

from schemas import ChannelKind

from ._provider import Capabilities, Provider
from ._transport import InboundTransport
from .providers import (
    CliProvider,
    DiscordGateway,
    DiscordProvider,
    EmailProvider,
    MatrixProvider,
    MatrixSync,
    SignalProvider,
    SignalReceive,
    SlackProvider,
    SlackSocketMode,
    TeamsProvider,
    TelegramPolling,
    TelegramProvider,
    WebhookProvider,
    WhatsAppProvider,
)

PROVIDERS: dict[str, type[Provider]] = {
    ChannelKind.TELEGRAM.value: TelegramProvider,
    ChannelKind.SLACK.value: SlackProvider,
    ChannelKind.DISCORD.value: DiscordProvider,
    ChannelKind.WHATSAPP.value: WhatsAppProvider,
    ChannelKind.EMAIL.value: EmailProvider,
    ChannelKind.WEBHOOK.value: WebhookProvider,
    ChannelKind.CLI.value: CliProvider,
    ChannelKind.MATRIX.value: MatrixProvider,
    ChannelKind.SIGNAL.value: SignalProvider,
    ChannelKind.TEAMS.value: TeamsProvider,
}


# The outbound transport of each kind that has one (`transport: outbound`).
TRANSPORTS: dict[str, type[InboundTransport]] = {
    ChannelKind.TELEGRAM.value: TelegramPolling,
    ChannelKind.DISCORD.value: DiscordGateway,
    ChannelKind.SLACK.value: SlackSocketMode,
    ChannelKind.MATRIX.value: MatrixSync,
    ChannelKind.SIGNAL.value: SignalReceive,
}


class UnknownProvider(KeyError):
    pass


def provider_class(kind: str) -> type[Provider]:
    try:
        return PROVIDERS[kind]
    except KeyError:
        raise UnknownProvider(
            f"unknown channel kind {kind!r}; known: {', '.join(sorted(PROVIDERS))}"
        ) from None


def capability_matrix() -> dict[str, Capabilities]:
    return {kind: cls.capabilities for kind, cls in PROVIDERS.items()}


def capability_rows() -> list[dict[str, Any]]:
    """The matrix as rows (for docs and the admin API)."""
    rows = []
    for kind, caps in capability_matrix().items():
        buttons = caps.buttons
        rows.append(
            {
                "kind": kind,
                "threads": caps.threads,
                "edit": caps.edit,
                "buttons": f"{buttons.max_count}/{buttons.max_rows}/{buttons.max_token_bytes}"
                if buttons
                else "none",
                "fileUpload": caps.file_upload,
                "fileDownload": caps.file_download,
                "typing": caps.typing,
                "reactions": caps.reactions,
                "maxTextLength": caps.max_text_length,
                "parseModes": sorted(caps.parse_modes),
                "maxFileBytes": caps.max_file_bytes,
                "interactionAck": caps.interaction_ack,
                "rateLimit": caps.rate_limit,
                "ephemeral": caps.ephemeral,
                "inbound": caps.inbound,
                "transports": _transports(kind, caps),
                "verification": caps.verification,
            }
        )
    return rows


_COLUMNS = (
    ("kind", "kind"),
    ("transports", "inbound transports"),
    ("verification", "verification"),
    ("maxTextLength", "text limit"),
    ("threads", "threads"),
    ("edit", "edits"),
    ("buttons", "buttons (n/rows/token bytes)"),
    ("typing", "typing"),
    ("reactions", "reactions"),
    ("fileUpload", "file upload"),
    ("fileDownload", "file download"),
    ("maxFileBytes", "max file bytes"),
    ("parseModes", "parse modes"),
    ("interactionAck", "interaction ack"),
    ("rateLimit", "rate limit"),
    ("ephemeral", "ephemeral"),
)


def _transports(kind: str, caps: Capabilities) -> list[str]:
    """How its traffic may arrive: `webhook`, `stdin`, and its outbound transport."""
    outbound = TRANSPORTS.get(kind)
    webhook = [] if caps.inbound == "outbound" else [caps.inbound]
    return webhook + ([f"outbound ({outbound.name})"] if outbound else [])


def capability_table_markdown() -> str:
    """The matrix as docs/channel-capabilities.md (`cowork schema export` writes it;
    a drift test keeps it true)."""

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list):
            return ", ".join(value)
        return str(value).replace("|", "/")

    lines = [
        "# Channel provider capabilities",
        "",
        "Generated from each provider's declared `capabilities` (`channels/_registry.py`) by",
        "`cowork schema export`; do not edit. The conformance suite",
        "(`tests/channels/test_channel_conformance.py`) checks every declaration against the",
        "provider's behaviour with its fake platform.",
        "",
        "| " + " | ".join(title for _, title in _COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    for row in capability_rows():
        lines.append("| " + " | ".join(cell(row[key]) for key, _ in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"
