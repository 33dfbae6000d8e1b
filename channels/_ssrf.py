"""Server-side request forgery protection for URLs that instance owners configure.

The generic webhook provider POSTs to a URL an operator typed in. Without care
that turns the hub into a proxy into its own network: cloud metadata endpoints
(credentials), loopback admin ports, private services. The rules:

- `https` only; plain `http` only to a loopback address, and only when the
  instance allows loopback (`allow_loopback_http`, for local receivers and tests);
- no credentials embedded in the URL (they would end up in logs and receipts);
- cloud metadata hosts and addresses are always refused, whatever is allowed;
- loopback, private, link-local, shared and reserved addresses are refused
  unless allowed (`allow_loopback_http` for loopback, `allow_private_networks`
  for the rest);
- the host is resolved once per send, every address it resolves to is checked,
  and the connection is pinned to the checked address (so a DNS answer that
  changes between check and connect - DNS rebinding - cannot redirect us);
- redirects are never followed (the caller passes `follow_redirects=False`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "169.254.170.2",  # AWS ECS task credentials
    )
)


class UnsafeUrl(ValueError):
    """A URL the SSRF policy refuses; the message says which rule, never a secret."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class UrlPolicy:
    allow_loopback_http: bool = False
    allow_private_networks: bool = False


@dataclass(frozen=True)
class PinnedTarget:
    """A checked URL and the one address the connection must go to."""

    url: httpx.URL
    host: str  # the name as written (Host header, TLS SNI and certificate check)
    address: IPAddress


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (one lookup)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _normalise(address: IPAddress) -> IPAddress:
    # ::ffff:169.254.169.254 reaches the IPv4 address; judge it as such.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check_address(address: IPAddress, policy: UrlPolicy) -> None:
    """Raise UnsafeUrl unless a connection to `address` is allowed."""
    address = _normalise(address)
    if address in METADATA_ADDRESSES:
        raise UnsafeUrl("ssrf.metadata", f"{address} is a cloud metadata address")
    if address.is_loopback:
        if not policy.allow_loopback_http:
            raise UnsafeUrl(
                "ssrf.loopback", f"{address} is a loopback address (allowLoopbackHttp is off)"
            )
        return
    if address.is_multicast or address.is_unspecified:
        raise UnsafeUrl("ssrf.reserved", f"{address} is not a unicast host address")
    if not address.is_global and not policy.allow_private_networks:
        raise UnsafeUrl(
            "ssrf.private",
            f"{address} is a private, link-local or reserved address (allowPrivateNetworks is off)",
        )


def check_url(url: str | httpx.URL, policy: UrlPolicy) -> httpx.URL:
    """The checks that need no DNS: scheme, credentials, metadata host names and
    literal addresses. Used at settings time and again before every send."""
    try:
        parsed = httpx.URL(str(url))
    except (httpx.InvalidURL, TypeError, ValueError):
        raise UnsafeUrl("ssrf.invalid", "not a valid URL") from None
    if parsed.scheme not in ("https", "http"):
        raise UnsafeUrl("ssrf.scheme", "only https URLs are allowed")
    if parsed.userinfo:
        raise UnsafeUrl("ssrf.credentials", "URLs must not embed credentials")
    host = parsed.host.rstrip(".").lower()
    if not host:
        raise UnsafeUrl("ssrf.invalid", "the URL has no host")
    if host in METADATA_HOSTS:
        raise UnsafeUrl("ssrf.metadata", f"{host} is a cloud metadata host")
    literal = _literal(host)
    if literal is not None:
        check_address(literal, policy)
        _check_scheme(parsed.scheme, literal, policy)
    elif parsed.scheme == "http" and not policy.allow_loopback_http:
        # A name's address is checked to be loopback when it is resolved, per send.
        raise UnsafeUrl(
            "ssrf.scheme", "plain http is allowed only to loopback (with allowLoopbackHttp)"
        )
    return parsed


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _check_scheme(scheme: str, address: IPAddress, policy: UrlPolicy) -> None:
    if scheme == "http" and not (_normalise(address).is_loopback and policy.allow_loopback_http):
        raise UnsafeUrl(
            "ssrf.scheme", "plain http is allowed only to loopback (with allowLoopbackHttp)"
        )


async def pin(
    url: str | httpx.URL, policy: UrlPolicy, resolve: Resolver | None = None
) -> PinnedTarget:
    """Check `url`, resolve its host once, check every address, pin the first."""
    parsed = check_url(url, policy)
    host = parsed.host
    literal = _literal(host)
    if literal is not None:
        return PinnedTarget(parsed, host, literal)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        answers = await (resolve or system_resolve)(host, port)
    except (OSError, UnicodeError):
        raise UnsafeUrl("ssrf.resolve", f"{host} does not resolve") from None
    addresses: list[IPAddress] = []
    for answer in answers:
        try:
            addresses.append(ipaddress.ip_address(answer.split("%", 1)[0]))
        except ValueError:
            continue
    if not addresses:
        raise UnsafeUrl("ssrf.resolve", f"{host} does not resolve")
    # One bad answer refuses the name: an attacker controls which one we would pick.
    for address in addresses:
        check_address(address, policy)
        _check_scheme(parsed.scheme, address, policy)
    return PinnedTarget(parsed, host, addresses[0])


def pinned_request(
    target: PinnedTarget, method: str, *, content: bytes, headers: dict[str, str]
) -> httpx.Request:
    """A request that connects to the pinned address while naming the original
    host in the Host header and (for https) in SNI and the certificate check."""
    return pin_request(httpx.Request(method, target.url, content=content, headers=headers), target)


def pin_request(request: httpx.Request, target: PinnedTarget) -> httpx.Request:
    """Point an already built request (JSON, form or multipart body) at the pinned
    address of `target`, which must have been pinned from this request's URL: the
    Host header and (for https) SNI and the certificate check keep the name."""
    address = _normalise(target.address)
    request.url = target.url.copy_with(host=str(address))
    request.headers["Host"] = target.url.netloc.decode("ascii")
    if target.url.scheme == "https":
        request.extensions["sni_hostname"] = target.host
    return request
