"""The Gateway appliance's own nats-server: a leaf node dialing out to Cloud NATS.

Why a leaf: the appliance's private traffic (its outbox, its own services) stays
on its own server, and what it sends to Cloud is stored locally in its own
JetStream domain while Cloud is unreachable. The leaf authenticates to Cloud
with the Gateway's `.creds` file, so Cloud's operator-mode permissions for that
Gateway decide what crosses: its publish rights limit what goes up, its
subscribe rights limit what comes down (offers, replies to its own inbox).

Local clients connect without authentication, so the server listens on the
loopback interface only; `deploy/nats/gateway-leaf.conf` is the same
configuration as a standalone file.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from urllib.parse import urlparse

import httpx

from schemas import nats_conf_string

from ..local import EmbeddedError, NatsServer, url_host

DEFAULT_CLOUD_LEAF_PORT = 7422
# Subjects that never leave the appliance (the outbox lives here). Cloud's
# permissions would refuse them too; this stops them at the source.
LOCAL_ONLY_SUBJECTS = ("gwlocal.>",)
LOOPBACK_HOSTS = ("127.0.0.1", "::1")
_DOMAIN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def gateway_domain(registration_id: str) -> str:
    """The JetStream domain of a Gateway's leaf server: distinct from Cloud's and every other's."""
    return check_domain(f"gw-{registration_id}")


def check_domain(domain: str) -> str:
    if not _DOMAIN.fullmatch(domain):
        raise EmbeddedError(
            f"JetStream domain {domain!r} is not valid (1-64 characters from A-Z a-z 0-9 _ -)"
        )
    if domain == "hub":
        raise EmbeddedError("JetStream domain 'hub' belongs to Cloud; choose another (--domain)")
    return domain


def cloud_leaf_urls(hub_urls: list[str], leaf_port: int = DEFAULT_CLOUD_LEAF_PORT) -> list[str]:
    """Cloud's leaf-node URLs from its client URLs: same hosts, the leaf-node port."""
    urls = []
    for url in hub_urls:
        parsed = urlparse(url if "://" in url else f"nats://{url}")
        if not parsed.hostname:
            raise EmbeddedError(f"cannot derive a leaf-node URL from hub URL {url!r}")
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        scheme = "tls" if parsed.scheme == "tls" else "nats-leaf"
        urls.append(f"{scheme}://{host}:{leaf_port}")
    return urls


def check_leaf_url(url: str) -> str:
    parsed = urlparse(url)
    if (
        parsed.scheme not in ("nats-leaf", "nats", "tls", "ws", "wss")
        or not parsed.hostname
        or parsed.port is None
    ):
        raise EmbeddedError(f"{url!r} is not a leaf-node URL (nats-leaf://HOST:PORT)")
    if parsed.username or parsed.password:
        raise EmbeddedError("a leaf-node URL must not carry credentials; the .creds file is used")
    return url


class GatewayLeafServer(NatsServer):
    """A loopback-only nats-server with JetStream in its own domain and one leaf remote."""

    def __init__(
        self,
        *,
        store_dir: Path,
        cloud_urls: list[str],
        credentials: Path,
        domain: str,
        port: int = 4223,
        host: str = "127.0.0.1",
        server_name: str | None = None,
        port_flag: str = "--nats-port",
        monitor_port: int | None = None,
    ) -> None:
        if host not in LOOPBACK_HOSTS:
            raise EmbeddedError(f"the Gateway's leaf server listens on loopback only, not {host!r}")
        if not cloud_urls:
            raise EmbeddedError("no Cloud leaf-node URL to dial")
        self.domain = check_domain(domain)
        self.cloud_urls = [check_leaf_url(u) for u in cloud_urls]
        self.credentials = Path(credentials).resolve()
        super().__init__(
            store_dir=store_dir,
            host=host,
            port=port,
            server_name=server_name or self.domain,
            port_flag=port_flag,
            monitor_port=monitor_port,
            extra_config=self._leaf_block(),
        )

    async def start(self, timeout: float = 10.0) -> None:
        if not self.credentials.is_file():
            raise EmbeddedError(
                f"Gateway credentials {self.credentials} not found; "
                "run `cowork gateway register` first"
            )
        await super().start(timeout)
        # A restart (supervisor) must come back where the agent and outbox reconnect.
        self._requested_port = self.port

    async def cloud_linked(self) -> bool:
        """True while the leaf connection to Cloud is up (needs `monitor_port`)."""
        if self.monitor_port is None or not self.running:
            return False
        try:
            async with httpx.AsyncClient(timeout=2.0) as http:
                reply = await http.get(f"http://{url_host(self.host)}:{self.monitor_port}/leafz")
            return reply.status_code == 200 and reply.json().get("leafnodes", 0) > 0
        except (httpx.HTTPError, ValueError):
            return False

    async def wait_linked(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the Cloud link; False if it is not up by then."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not await self.cloud_linked():
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    def _leaf_block(self) -> str:
        q = nats_conf_string
        urls = ", ".join(q(u) for u in self.cloud_urls)
        deny = ", ".join(q(s) for s in LOCAL_ONLY_SUBJECTS)
        return "\n".join(
            [
                "leafnodes {",
                "  # Retry Cloud every second while it is unreachable; local clients keep working.",
                '  reconnect: "1s"',
                "  remotes: [",
                f"    {{ urls: [{urls}], credentials: {q(self.credentials)}, deny_exports: [{deny}] }}",
                "  ]",
                "}",
            ]
        )

    def _config_text(self) -> str:
        # A second `jetstream {}` block would REPLACE the first (store_dir included;
        # verified: the server fell back to its temp dir), so the domain goes inside it.
        text = super()._config_text()
        marker = "jetstream {\n"
        if marker not in text:
            raise EmbeddedError("cannot place the JetStream domain in the generated config")
        return text.replace(marker, f"{marker}  domain: {nats_conf_string(self.domain)}\n", 1)
