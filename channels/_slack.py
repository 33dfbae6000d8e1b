"""Slack provider. SKELETON: to be replaced by the provider's implementation."""

from __future__ import annotations

from ._provider import ProviderSettings


class SlackSettings(ProviderSettings):
    api_base: str | None = None


class SlackSecrets(ProviderSettings):
    pass


class SlackProvider:
    kind = "slack"
    capabilities = None
    settings_model = SlackSettings
    secrets_model = SlackSecrets
