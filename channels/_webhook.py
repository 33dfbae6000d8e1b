"""Webhook provider. SKELETON: to be replaced by the provider's implementation."""

from __future__ import annotations

from ._provider import ProviderSettings


class WebhookSettings(ProviderSettings):
    api_base: str | None = None


class WebhookSecrets(ProviderSettings):
    pass


class WebhookProvider:
    kind = "webhook"
    capabilities = None
    settings_model = WebhookSettings
    secrets_model = WebhookSecrets
