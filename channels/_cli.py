"""Cli provider. SKELETON: to be replaced by the provider's implementation."""

from __future__ import annotations

from ._provider import ProviderSettings


class CliSettings(ProviderSettings):
    api_base: str | None = None


class CliSecrets(ProviderSettings):
    pass


class CliProvider:
    kind = "cli"
    capabilities = None
    settings_model = CliSettings
    secrets_model = CliSecrets
