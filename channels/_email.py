"""Email provider. SKELETON: to be replaced by the provider's implementation."""

from __future__ import annotations

from ._provider import ProviderSettings


class EmailSettings(ProviderSettings):
    api_base: str | None = None


class EmailSecrets(ProviderSettings):
    pass


class EmailProvider:
    kind = "email"
    capabilities = None
    settings_model = EmailSettings
    secrets_model = EmailSecrets
