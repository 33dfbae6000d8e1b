"""Hub configuration: environment variables with the COWORK_ prefix, overridable by flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._streams import StreamLimits

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]


class HubSettings(BaseSettings):
    """Everything `cowork hub serve` needs; `cowork up` fills these for its embedded servers."""

    model_config = SettingsConfigDict(env_prefix="COWORK_", extra="ignore")

    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server URL(s), comma separated"
    )
    nats_creds: Path | None = Field(
        default=None, description="A NATS .creds file for the hub's own user"
    )
    keys_dir: Path | None = Field(
        default=None, description="Bus key hierarchy (operator mode): the hub mints all credentials"
    )
    secret_key: SecretStr | None = Field(
        default=None, description="Fernet key encrypting the signing keys at rest (else a key file)"
    )
    edge_credential_ttl_hours: float = Field(default=24.0, gt=0, le=720)
    command_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long a Desktop holds a command before it is re-sent",
    )
    work_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Lease TTL of Cloud-owned edge work; renewed while it runs",
    )
    work_max_attempts: int = Field(
        default=3, ge=1, le=100, description="Leases a work item may expire before dead-letter"
    )
    gateway_credential_ttl_days: float = Field(
        default=30.0,
        gt=0,
        le=365,
        description="How long a Gateway registration credential is valid",
    )
    gateway_heartbeat_rate: float = Field(
        default=2.0, gt=0, description="Heartbeats per second a Gateway may send (burst 10)"
    )
    presence_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="After this replica's NATS connection comes back, how long it waits, "
        "and how long after the last edge came back, before marking edges offline or "
        "unhealthy for missing heartbeats (they are reconnecting too; at most ten times this)",
    )
    work_write_rate: float = Field(
        default=500.0, gt=0, description="Fenced writes per second a Gateway may send (burst 1000)"
    )
    bootstrap_connections_per_source: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Connections one address may hold in the public bootstrap account "
        "(the newest beyond it are closed)",
    )
    bootstrap_source_rate: float = Field(
        default=20.0,
        gt=0,
        le=10_000,
        description="Bootstrap requests (pairing, registration) per second one address may "
        "make after a burst of 100: raise it for a site that pairs a fleet behind one NAT",
    )
    bootstrap_connection_max_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Longest a bootstrap connection may stay open (pair, register, leave)",
    )
    channel_secrets_key: SecretStr | None = Field(
        default=None,
        description="Key for channel instance secrets at rest when there is no key "
        "hierarchy (COWORK_KEYS_DIR derives one otherwise)",
    )
    channel_body_limit_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest webhook body accepted",
    )
    channel_source_rate: float = Field(
        default=50.0, gt=0, description="Webhook requests per second per source"
    )
    trusted_proxies: str = Field(
        default="",
        description="Comma-separated addresses or networks of reverse proxies whose "
        "X-Forwarded-For names the client (webhook rate limits and lockout); "
        "empty: the socket address is the client",
    )
    stream_max_bytes: int = Field(
        default=1024**3,
        ge=1024 * 1024,
        description="Bytes each hub stream and KV bucket may hold (a stream then drops "
        "its oldest messages; the KV bucket refuses new keys)",
    )
    event_partitions: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Partitions of the Desktop event stream, each projected by its own "
        "consumer: a flood from one Desktop holds up only its partition (changing it: "
        "docs/operations.md)",
    )
    event_rate_per_desktop: float = Field(
        default=1000.0,
        ge=1.0,
        description="Events a second each Desktop is projected at once over its burst: "
        "beyond, its events wait in a lane of their own, at this rate, so its partition's "
        "other Desktops never wait behind it",
    )
    event_burst_per_desktop: float = Field(
        default=2000.0,
        ge=100.0,
        description="Events a Desktop may send at once before its rate applies",
    )
    event_lanes_per_partition: int = Field(
        default=16,
        ge=0,
        le=1000,
        description="Desktops over their rate that may have a lane at once in one "
        "partition (each is a JetStream consumer); beyond, they wait in line",
    )
    partition_lease_seconds: float = Field(
        default=6.0,
        ge=2.0,
        le=60.0,
        description="How long a dead replica's partitions stay unworked before another "
        "replica takes them over (each replica renews its leases every third of this)",
    )
    stream_max_msg_size: int = Field(
        default=1024 * 1024,
        ge=4096,
        le=64 * 1024 * 1024,
        description="Largest message a hub stream stores",
    )
    desktop_max_payload_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest message a Desktop may publish (its user JWT, enforced by NATS)",
    )
    gateway_max_payload_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest message a Gateway may publish (its user JWT, enforced by NATS)",
    )
    channel_max_payload_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest message a channel instance may publish (its user JWT)",
    )
    edge_max_subscriptions: int = Field(
        default=1000, ge=10, description="Subscriptions one edge connection may hold (its user JWT)"
    )
    http_header_timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="A connection must send a request's headers within this time of "
        "connecting (or of its previous answer), else it is closed; also the idle keep-alive",
    )
    http_body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A request's body must have arrived within this time of its headers, "
        "else the connection is closed",
    )
    metrics_require_token: bool = Field(
        default=False,
        description="/metrics needs the admin bearer token (it names channel instances)",
    )
    database_url: SecretStr | None = Field(default=None, description="PostgreSQL DSN")
    admin_token: SecretStr | None = Field(default=None, description="Bearer token for /api/ routes")
    viewer_token: SecretStr | None = Field(
        default=None,
        description="Read-only token: GET on /api/ routes, and a viewer's console session",
    )
    console_session_minutes: float = Field(
        default=480.0, gt=0, le=7 * 24 * 60, description="How long a console sign-in lasts"
    )
    public_nats_url: str | None = Field(
        default=None,
        description="The NATS URL(s) Desktops and Gateways dial, as shown by the console "
        "(default: COWORK_NATS_URL)",
    )
    public_http_url: str | None = Field(
        default=None,
        description="The hub's public HTTP base (webhook URLs, pairing links); default: "
        "the address the console was reached at",
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"
    hub_id: str = Field(default="hub", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    db_pool_min: int = Field(default=1, ge=0)
    db_pool_max: int = Field(default=10, ge=1)
    ready_timeout_seconds: float = Field(default=2.0, gt=0)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        import ipaddress

        for item in value.split(","):
            if item.strip():
                try:
                    ipaddress.ip_network(item.strip(), strict=False)
                except ValueError:
                    raise ValueError(f"{item.strip()!r} is not an address or network") from None
        return value

    @property
    def trusted_proxy_networks(self) -> list:
        import ipaddress

        return [
            ipaddress.ip_network(i.strip(), strict=False)
            for i in self.trusted_proxies.split(",")
            if i.strip()
        ]

    @field_validator("nats_url")
    @classmethod
    def _nats_scheme(cls, value: str) -> str:
        for url in value.split(","):
            if not url.strip().startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError(f"{url.strip()!r} is not a nats://, tls://, ws:// or wss:// URL")
        return value

    def channel_secret_key(self) -> bytes:
        """32 bytes for channel secrets when no key hierarchy is configured."""
        import hashlib
        import os

        if self.channel_secrets_key is not None:
            return hashlib.sha256(self.channel_secrets_key.get_secret_value().encode()).digest()
        return os.urandom(32)  # secrets then last only as long as this process

    def stream_limits(self) -> StreamLimits:
        return StreamLimits(
            max_bytes=self.stream_max_bytes,
            max_msg_size=self.stream_max_msg_size,
            event_partitions=self.event_partitions,
            lease_seconds=self.partition_lease_seconds,
        )

    @property
    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @property
    def edge_nats_urls(self) -> list[str]:
        """What edges dial: COWORK_PUBLIC_NATS_URL, else the hub's own NATS URL(s)."""
        value = self.public_nats_url or self.nats_url
        return [u.strip() for u in value.split(",") if u.strip()]
