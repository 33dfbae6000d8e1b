"""SSRF protection of the generic webhook's outbound requests (channels/_ssrf.py):
every rule, DNS answers pointing inside (resolver replaced), redirects, and a
real loopback delivery when loopback is allowed."""

from __future__ import annotations

import ipaddress

import httpx
import pytest
from fakeplatforms.webhook import FakeWebhook
from pydantic import ValidationError

from channels import DeliveryFailed, InstanceConfig
from channels._ssrf import UnsafeUrl, UrlPolicy, check_url, pin, pinned_request
from channels.providers._webhook import WebhookProvider, WebhookSecrets, WebhookSettings
from schemas import ChannelOutbound, ChannelTarget

STRICT = UrlPolicy()
LOOPBACK = UrlPolicy(allow_loopback_http=True)
EVERYTHING = UrlPolicy(allow_loopback_http=True, allow_private_networks=True)


def resolver(*answers: str, calls: list[str] | None = None):
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        return list(answers)

    return resolve


@pytest.mark.parametrize(
    "url,code",
    [
        ("ftp://example.com/hook", "ssrf.scheme"),
        ("file:///etc/passwd", "ssrf.scheme"),
        ("http://example.com/hook", "ssrf.scheme"),
        ("https://user:pw@example.com/hook", "ssrf.credentials"),
        ("https://token@example.com/hook", "ssrf.credentials"),
        ("https://169.254.169.254/latest/meta-data", "ssrf.metadata"),
        ("https://metadata.google.internal/computeMetadata/v1", "ssrf.metadata"),
        ("https://METADATA.google.internal./x", "ssrf.metadata"),
        ("https://[fd00:ec2::254]/x", "ssrf.metadata"),
        ("https://100.100.100.200/x", "ssrf.metadata"),
        ("https://[::ffff:169.254.169.254]/x", "ssrf.metadata"),
        ("https://10.1.2.3/hook", "ssrf.private"),
        ("https://192.168.1.1/hook", "ssrf.private"),
        ("https://172.16.0.1/hook", "ssrf.private"),
        ("https://169.254.10.10/hook", "ssrf.private"),
        ("https://100.64.0.1/hook", "ssrf.private"),
        ("https://[fc00::1]/hook", "ssrf.private"),
        ("https://[fe80::1]/hook", "ssrf.private"),
        ("https://240.0.0.1/hook", "ssrf.private"),
        ("https://0.0.0.0/hook", "ssrf.reserved"),
        ("https://224.0.0.1/hook", "ssrf.reserved"),
        ("https://127.0.0.1/hook", "ssrf.loopback"),
        ("https://[::1]/hook", "ssrf.loopback"),
        ("not a url at all", "ssrf.scheme"),
    ],
)
def test_static_rules_refuse(url, code):
    with pytest.raises(UnsafeUrl) as caught:
        check_url(url, STRICT)
    assert caught.value.code == code


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/",
        "https://metadata.google.internal/",
        "https://[fd00:ec2::254]/",
        "http://100.100.100.200/",
    ],
)
def test_metadata_is_refused_whatever_is_allowed(url):
    with pytest.raises(UnsafeUrl) as caught:
        check_url(url, EVERYTHING)
    assert caught.value.code == "ssrf.metadata"


def test_what_the_flags_allow():
    check_url("https://hooks.example.com/x", STRICT)
    check_url("http://127.0.0.1:8080/x", LOOPBACK)
    check_url("https://127.0.0.1/x", LOOPBACK)
    check_url("https://10.0.0.7/x", UrlPolicy(allow_private_networks=True))
    # Private networks are allowed over https only: plain http stays loopback-only.
    with pytest.raises(UnsafeUrl):
        check_url("http://10.0.0.7/x", EVERYTHING)
    with pytest.raises(UnsafeUrl):
        check_url("https://127.0.0.1/x", UrlPolicy(allow_private_networks=True))


def test_settings_refuse_an_unsafe_delivery_url():
    for url, flags in [
        ("http://169.254.169.254/", {"allowLoopbackHttp": True, "allowPrivateNetworks": True}),
        ("http://127.0.0.1:9/hook", {}),
        ("https://a:b@example.com/", {}),
        ("https://10.0.0.1/", {}),
    ]:
        with pytest.raises(ValidationError) as caught:
            WebhookSettings.model_validate({"deliveryUrl": url, **flags})
        assert "deliveryUrl" in str(caught.value)
    ok = WebhookSettings.model_validate({"deliveryUrl": "https://hooks.example.com/in"})
    assert ok.policy == STRICT


@pytest.mark.parametrize(
    "answers,policy,code",
    [
        (["10.0.0.5"], STRICT, "ssrf.private"),
        (["169.254.169.254"], EVERYTHING, "ssrf.metadata"),
        (["fd00:ec2::254"], EVERYTHING, "ssrf.metadata"),
        (["127.0.0.1"], STRICT, "ssrf.loopback"),
        (["93.184.216.34", "192.168.0.10"], STRICT, "ssrf.private"),  # any bad answer refuses
        ([], STRICT, "ssrf.resolve"),
    ],
)
async def test_names_resolving_inside_are_refused(answers, policy, code):
    with pytest.raises(UnsafeUrl) as caught:
        await pin("https://innocent.example.com/hook", policy, resolver(*answers))
    assert caught.value.code == code


async def test_a_name_over_http_must_resolve_to_loopback():
    with pytest.raises(UnsafeUrl) as caught:
        await pin("http://receiver.example.com/hook", EVERYTHING, resolver("10.0.0.9"))
    assert caught.value.code == "ssrf.scheme"
    target = await pin("http://receiver.example.com/hook", LOOPBACK, resolver("127.0.0.1"))
    assert target.address == ipaddress.ip_address("127.0.0.1")


async def test_the_connection_is_pinned_to_the_checked_address():
    target = await pin(
        "https://hooks.example.com:8443/in?x=1", STRICT, resolver("93.184.216.34", "93.184.216.35")
    )
    request = pinned_request(target, "POST", content=b"{}", headers={"X-A": "b"})
    assert request.url.host == "93.184.216.34" and request.url.port == 8443
    assert request.url.path == "/in" and request.url.query == b"x=1"
    assert request.headers["Host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"  # TLS name + cert check
    six = await pin("https://v6.example.com/", STRICT, resolver("2606:2800:220:1::1"))
    assert pinned_request(six, "POST", content=b"", headers={}).url.host == "2606:2800:220:1::1"


# --- the provider: every send goes through the policy ------------------------------------------
def provider_for(fake: FakeWebhook, http: httpx.AsyncClient, **settings) -> WebhookProvider:
    config = InstanceConfig(
        tenant="acme",
        instance_id="webhook-ssrf",
        kind="webhook",
        workspace_id="ws1",
        settings=WebhookSettings.model_validate({**fake.instance_settings(), **settings}),
        secrets=WebhookSecrets.model_validate(fake.instance_secrets()),
    )
    return WebhookProvider(config, http)


def text(n: int = 1) -> ChannelOutbound:
    return ChannelOutbound(
        delivery_id=f"d{n}",
        idempotency_key=f"d{n}",
        type="text",
        target=ChannelTarget(chat_id="room-1"),
        text=f"hello {n}",
    )


@pytest.fixture
async def receiver():
    fake = FakeWebhook()
    await fake.start()
    async with httpx.AsyncClient() as http:
        yield fake, http
    await fake.stop()


async def test_a_loopback_delivery_works_when_allowed(receiver):
    fake, http = receiver
    sent = await provider_for(fake, http).send(text())
    assert fake.rejected == [] and fake.texts("room-1") == ["hello 1"]
    assert sent.provider_message_id == fake.chats["room-1"][0].message_id


async def test_a_name_is_resolved_once_per_send_and_the_host_header_kept(receiver, monkeypatch):
    fake, http = receiver
    port = httpx.URL(fake.base_url).port
    calls: list[str] = []
    monkeypatch.setattr(WebhookProvider, "resolve", resolver("127.0.0.1", calls=calls))
    provider = provider_for(fake, http, deliveryUrl=f"http://receiver.test:{port}/hook")
    await provider.send(text(1))
    await provider.send(text(2))
    assert calls == ["receiver.test", "receiver.test"]
    assert fake.hosts == [f"receiver.test:{port}"] * 2
    assert fake.texts("room-1") == ["hello 1", "hello 2"]


async def test_dns_rebinding_after_configuration_is_refused_per_send(receiver, monkeypatch):
    fake, http = receiver
    port = httpx.URL(fake.base_url).port
    monkeypatch.setattr(WebhookProvider, "resolve", resolver("127.0.0.1"))
    provider = provider_for(fake, http, deliveryUrl=f"http://receiver.test:{port}/hook")
    await provider.send(text(1))
    monkeypatch.setattr(WebhookProvider, "resolve", resolver("169.254.169.254"))
    with pytest.raises(DeliveryFailed) as caught:
        await provider.send(text(2))
    assert caught.value.permanent and caught.value.code == "ssrf.metadata"
    assert fake.texts("room-1") == ["hello 1"]


async def test_loopback_needs_its_flag_even_when_resolved_from_a_name(receiver, monkeypatch):
    fake, http = receiver
    port = httpx.URL(fake.base_url).port
    monkeypatch.setattr(WebhookProvider, "resolve", resolver("127.0.0.1"))
    provider = provider_for(
        fake, http, deliveryUrl=f"https://receiver.test:{port}/hook", allowLoopbackHttp=False
    )
    with pytest.raises(DeliveryFailed) as caught:
        await provider.send(text())
    assert caught.value.code == "ssrf.loopback" and fake.calls == []


async def test_redirects_are_not_followed(receiver):
    fake, http = receiver
    fake.redirect_to = f"{fake.base_url}/elsewhere"
    with pytest.raises(DeliveryFailed) as caught:
        await provider_for(fake, http).send(text())
    assert caught.value.permanent and caught.value.code == "ssrf.redirect"
    assert [op for op, _ in fake.calls] == ["text"]  # never "elsewhere"
