"""Fake chat platforms for the channel tests, by kind.

Every kind in channels.PROVIDERS must have a fake here: the conformance suite
(tests/channels/test_channel_conformance.py) fails for a kind without one.
"""

from __future__ import annotations

from ._base import FakePlatform, Posted, webhook_request
from .cli import FakeCli
from .discord import FakeDiscord
from .email import FakeEmail
from .matrix import FakeMatrix
from .signal import FakeSignal
from .slack import FakeSlack
from .teams import FakeTeams
from .telegram import FakeTelegram
from .webhook import FakeWebhook
from .whatsapp import FakeWhatsApp

FAKES: dict[str, type[FakePlatform]] = {
    "telegram": FakeTelegram,
    "slack": FakeSlack,
    "discord": FakeDiscord,
    "whatsapp": FakeWhatsApp,
    "email": FakeEmail,
    "webhook": FakeWebhook,
    "cli": FakeCli,
    "matrix": FakeMatrix,
    "signal": FakeSignal,
    "teams": FakeTeams,
}

__all__ = ["FAKES", "FakePlatform", "Posted", "webhook_request"]
