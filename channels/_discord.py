"""Discord provider. SKELETON: to be replaced by the provider's implementation."""

from __future__ import annotations

from ._provider import ProviderSettings


class DiscordSettings(ProviderSettings):
    api_base: str | None = None


class DiscordSecrets(ProviderSettings):
    pass


class DiscordProvider:
    kind = "discord"
    capabilities = None
    settings_model = DiscordSettings
    secrets_model = DiscordSecrets
