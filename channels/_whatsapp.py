"""WhatsApp provider. SKELETON: to be replaced by the provider's implementation."""

from __future__ import annotations

from ._provider import ProviderSettings


class WhatsAppSettings(ProviderSettings):
    api_base: str | None = None


class WhatsAppSecrets(ProviderSettings):
    pass


class WhatsAppProvider:
    kind = "whatsapp"
    capabilities = None
    settings_model = WhatsAppSettings
    secrets_model = WhatsAppSecrets
