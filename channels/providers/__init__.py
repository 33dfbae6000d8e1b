"""The chat platform providers, one module each, behind the one `Provider`
protocol, with their shared HTTP, payload and SSRF helpers.
"""

from __future__ import annotations

from ._cli import STDIN_METHOD, CliProvider, CliSecrets, CliSettings
from ._discord import DiscordProvider
from ._discord_gateway import DiscordGateway
from ._email import EmailProvider
from ._matrix import MatrixProvider
from ._matrix_sync import MatrixSync
from ._signal import SignalProvider
from ._signal_rpc import SignalReceive
from ._slack import SlackProvider
from ._slack_socket import SlackSocketMode
from ._teams import TeamsProvider
from ._telegram import TelegramProvider
from ._telegram_polling import TelegramPolling
from ._webhook import WebhookProvider
from ._whatsapp import WhatsAppProvider

__all__ = [
    "CliProvider",
    "CliSecrets",
    "CliSettings",
    "DiscordGateway",
    "DiscordProvider",
    "EmailProvider",
    "MatrixProvider",
    "MatrixSync",
    "STDIN_METHOD",
    "SignalProvider",
    "SignalReceive",
    "SlackProvider",
    "SlackSocketMode",
    "TeamsProvider",
    "TelegramPolling",
    "TelegramProvider",
    "WebhookProvider",
    "WhatsAppProvider",
]
