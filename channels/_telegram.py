"""Telegram provider. SKELETON: to be replaced by the provider's implementation."""

from __future__ import annotations

from ._provider import ProviderSettings


class TelegramSettings(ProviderSettings):
    api_base: str | None = None


class TelegramSecrets(ProviderSettings):
    pass


class TelegramProvider:
    kind = "telegram"
    capabilities = None
    settings_model = TelegramSettings
    secrets_model = TelegramSecrets
