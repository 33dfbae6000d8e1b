"""An operator-set `apiBase` of the chat providers (Telegram, Slack, Discord,
WhatsApp) goes through the webhook kind's SSRF protection on every call: the
host name is resolved once per call, every address checked, and the connection
pinned to the checked address (channels/_ssrf.py via _platform_http.call_json).

The tests run each provider against its fake platform behind a simulated
network (`Network`): the name server is the test's (`Dns`, what an attacker's
name server answers right now, injected as the provider class's `resolve`, as
the webhook kind's tests do), and every address the hub connects to is served
by the fake. So a call the policy failed to refuse would really arrive, with
the bot's token, and the tests would see it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fakeplatforms import FAKES, FakePlatform

import channels
from channels import DeliveryFailed, InstanceConfig
from schemas import ChannelFile, ChannelOutbound, ChannelTarget

CHAT_KINDS = ["discord", "slack", "telegram", "whatsapp"]
PUBLIC = "93.184.216.34"  # a public address (not loopback, private or reserved)
NAME = "platform.test"
REAL_HOSTS = {
    "discord": "discord.com",
    "slack": "slack.com",
    "telegram": "api.telegram.org",
    "whatsapp": "graph.facebook.com",
}


@dataclass
class Dns:
    """The name server: `answers` now, or one answer list per lookup from `queue`."""

    answers: list[str] = field(default_factory=lambda: [PUBLIC])
    queue: list[list[str]] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return list(self.queue.pop(0) if self.queue else self.answers)


@dataclass
class Sent:
    address: str  # where the connection went
    host: str  # the Host header
    sni: str | None
    carried_secret: bool


class Network(httpx.AsyncBaseTransport):
    """Every address reaches the fake platform (plain http on its loopback port);
    a name in a URL (a request that was not pinned) is resolved by `dns` here, as
    httpx would resolve it at connect time."""

    def __init__(self, fake: FakePlatform, dns: Dns, secret: str) -> None:
        self.port = httpx.URL(fake.base_url).port
        self.dns, self.secret = dns, secret
        self.sent: list[Sent] = []
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            address = self.dns.answers[0]
        carried = self.secret in str(request.url) or self.secret in request.headers.get(
            "authorization", ""
        )
        sni = request.extensions.get("sni_hostname")
        self.sent.append(Sent(address, request.headers.get("host", ""), sni, carried))
        request.url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self.port)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def secret_of(fake: FakePlatform) -> str:
    secrets = fake.instance_secrets()
    return secrets.get("botToken") or secrets["accessToken"]


def api_base(fake: FakePlatform, scheme: str) -> str:
    """The fake's apiBase (Slack's ends in /api) under the made-up name."""
    base = httpx.URL(fake.instance_settings()["apiBase"])
    return str(base.copy_with(scheme=scheme, host=NAME)).rstrip("/")


@dataclass
class Rig:
    kind: str
    fake: FakePlatform
    dns: Dns
    net: Network
    http: httpx.AsyncClient
    secret: str

    def provider(self, **settings: Any) -> Any:
        cls = channels.PROVIDERS[self.kind]
        config = InstanceConfig(
            tenant="acme",
            instance_id=f"{self.kind}-rebind",
            kind=self.kind,
            workspace_id="ws1",
            settings=cls.settings_model.model_validate(
                {**self.fake.instance_settings(), **settings}
            ),
            secrets=cls.secrets_model.model_validate(self.fake.instance_secrets()),
        )
        return cls(config, self.http)

    def text(self, n: int) -> ChannelOutbound:
        return ChannelOutbound(
            delivery_id=f"d{n}",
            idempotency_key=f"d{n}",
            type="text",
            target=ChannelTarget(chat_id=self.fake.chat_ref("100")),
            text=f"hello {n}",
        )

    def texts(self) -> list[str]:
        return [posted.text for posted in self.fake.chats.get(self.fake.chat_ref("100"), [])]


@pytest.fixture(params=CHAT_KINDS)
async def rig(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    kind = request.param
    fake = FAKES[kind]()
    await fake.start()
    dns = Dns()
    monkeypatch.setattr(channels.PROVIDERS[kind], "resolve", dns.resolve)
    net = Network(fake, dns, secret_of(fake))
    try:
        async with httpx.AsyncClient(transport=net) as http:
            yield Rig(kind, fake, dns, net, http, secret_of(fake))
    finally:
        await fake.stop()


@pytest.mark.parametrize(
    "rebound,code",
    [
        ("127.0.0.1", "ssrf.loopback"),
        ("10.0.0.1", "ssrf.private"),
        ("169.254.169.254", "ssrf.metadata"),
    ],
)
async def test_a_name_rebinding_inside_never_gets_the_token(rig: Rig, rebound: str, code: str):
    port = httpx.URL(rig.fake.base_url).port
    provider = rig.provider(apiBase=api_base(rig.fake, "https"), allowLoopbackHttp=False)
    await provider.send(rig.text(1))  # the name resolves to a public address: delivered
    assert rig.texts() == ["hello 1"]
    calls, sent = list(rig.fake.calls), len(rig.net.sent)

    rig.dns.answers = [rebound]  # the operator's name now points inside
    for attempt in (provider.send(rig.text(2)), provider.probe()):
        with pytest.raises(DeliveryFailed) as caught:
            await attempt
        assert caught.value.permanent and caught.value.code == code, caught.value
        assert rebound in str(caught.value) and rig.secret not in str(caught.value)
    assert len(rig.net.sent) == sent, rig.net.sent[sent:]  # nothing sent anywhere
    assert rig.fake.calls == calls and rig.texts() == ["hello 1"]
    assert rig.dns.lookups == [NAME] * 3  # resolved once per call, never cached
    assert [(s.address, s.host, s.sni) for s in rig.net.sent] == [
        (PUBLIC, f"{NAME}:{port}", NAME)  # pinned; the name kept for Host, SNI and the cert
    ]


async def test_one_bad_answer_among_good_ones_refuses_the_name(rig: Rig):
    rig.dns.answers = [PUBLIC, "192.168.0.10"]
    provider = rig.provider(apiBase=api_base(rig.fake, "https"), allowLoopbackHttp=False)
    with pytest.raises(DeliveryFailed) as caught:
        await provider.send(rig.text(1))
    assert caught.value.permanent and caught.value.code == "ssrf.private"
    assert rig.net.sent == [] and rig.fake.calls == []


@pytest.mark.parametrize(
    "answer,scheme,flags",
    [
        ("127.0.0.1", "http", {"allowLoopbackHttp": True}),
        ("10.0.0.1", "https", {"allowLoopbackHttp": False, "allowPrivateNetworks": True}),
    ],
)
async def test_the_flags_still_allow_a_local_or_private_platform(
    rig: Rig, answer: str, scheme: str, flags: dict[str, bool]
):
    rig.dns.answers = [answer]
    provider = rig.provider(apiBase=api_base(rig.fake, scheme), **flags)
    await provider.send(rig.text(1))
    await provider.probe()
    assert rig.texts() == ["hello 1"]
    assert {s.address for s in rig.net.sent} == {answer}
    assert all(s.carried_secret for s in rig.net.sent)  # the platform did get its token


async def test_metadata_is_refused_whatever_the_flags_allow(rig: Rig):
    rig.dns.answers = ["169.254.169.254"]
    provider = rig.provider(
        apiBase=api_base(rig.fake, "https"), allowLoopbackHttp=True, allowPrivateNetworks=True
    )
    with pytest.raises(DeliveryFailed) as caught:
        await provider.send(rig.text(1))
    assert caught.value.code == "ssrf.metadata" and rig.net.sent == []


async def test_the_loopback_fake_by_address_needs_no_lookup(rig: Rig):
    """What the conformance suite and local fakes use: a literal loopback address
    with allowLoopbackHttp, checked per call without DNS."""
    provider = rig.provider()  # the fake's own settings: http://127.0.0.1:port
    await provider.send(rig.text(1))
    assert rig.texts() == ["hello 1"] and rig.dns.lookups == []
    assert [s.address for s in rig.net.sent] == ["127.0.0.1"]


# --- the real platform API (apiBase unset) is called as before -------------------------------
@pytest.mark.parametrize("kind", CHAT_KINDS)
async def test_the_real_api_is_not_pinned(kind: str, monkeypatch: pytest.MonkeyPatch):
    dns = Dns()
    monkeypatch.setattr(channels.PROVIDERS[kind], "resolve", dns.resolve)
    seen: list[httpx.Request] = []

    def platform(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"ok": True, "result": {"username": "bot", "id": 1}, "id": "1"}
        )

    fake = FAKES[kind]()  # not started: only its secrets and settings are used
    settings = {
        k: v
        for k, v in fake.instance_settings().items()
        if k not in ("apiBase", "allowLoopbackHttp")
    }
    cls = channels.PROVIDERS[kind]
    config = InstanceConfig(
        tenant="acme",
        instance_id=f"{kind}-real",
        kind=kind,
        workspace_id="ws1",
        settings=cls.settings_model.model_validate(settings),
        secrets=cls.secrets_model.model_validate(fake.instance_secrets()),
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(platform)) as http:
        await cls(config, http).probe()
    assert dns.lookups == []
    assert [r.url.host for r in seen] == [REAL_HOSTS[kind]]
    assert "sni_hostname" not in seen[0].extensions


# --- file uploads under apiBase ---------------------------------------------------------------
async def test_a_slack_upload_url_is_pinned_too(monkeypatch: pytest.MonkeyPatch):
    fake = FAKES["slack"]()
    await fake.start()
    try:
        port = httpx.URL(fake.base_url).port
        # Slack answers an upload URL on the configured origin (same-origin is allowed).
        monkeypatch.setattr(fake, "base_url", f"https://{NAME}:{port}")
        dns = Dns(queue=[[PUBLIC], ["127.0.0.1"]])  # rebinds between ticket and upload
        monkeypatch.setattr(channels.PROVIDERS["slack"], "resolve", dns.resolve)
        net = Network(fake, dns, secret_of(fake))
        async with httpx.AsyncClient(transport=net) as http:
            rig = Rig("slack", fake, dns, net, http, secret_of(fake))
            provider = rig.provider(apiBase=f"https://{NAME}:{port}/api", allowLoopbackHttp=False)
            delivery = ChannelOutbound(
                delivery_id="f1",
                idempotency_key="f1",
                type="file",
                target=ChannelTarget(chat_id="100"),
                file=ChannelFile(
                    filename="a.txt", mime_type="text/plain", content_base64="aGVsbG8="
                ),
            )
            with pytest.raises(DeliveryFailed) as caught:
                await provider.send(delivery)
            assert caught.value.code == "ssrf.loopback" and caught.value.permanent
            assert [op for op, _ in fake.calls] == ["files.getUploadURLExternal"]
            assert [s.address for s in net.sent] == [PUBLIC]

            dns.answers = [PUBLIC]  # a name that stays public: all three steps pinned
            await provider.send(delivery.model_copy(update={"delivery_id": "f2"}))
            assert [s.address for s in net.sent] == [PUBLIC] * 4
            assert dns.lookups == [NAME] * 5
            assert "upload" in [op for op, _ in fake.calls]
    finally:
        await fake.stop()
