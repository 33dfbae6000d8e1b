"""Platform-specific outbound behaviour of the WhatsApp, email and webhook providers
(the shared claims are in tests/channels/test_channel_conformance.py)."""

from __future__ import annotations

import base64
from email.message import EmailMessage

import httpx
import pytest
from fakeplatforms.email import FakeEmail
from fakeplatforms.webhook import FakeWebhook
from fakeplatforms.whatsapp import FakeWhatsApp

from channels import DeliveryFailed, InstanceConfig, provider_class
from schemas import ChannelButton, ChannelOutbound, ChannelTarget


@pytest.fixture
async def http():
    async with httpx.AsyncClient() as client:
        yield client


async def rig(kind: str, fake, http):
    await fake.start()
    cls = provider_class(kind)
    config = InstanceConfig(
        tenant="acme",
        instance_id=f"{kind}-x",
        kind=kind,
        workspace_id="ws1",
        settings=cls.settings_model.model_validate(fake.instance_settings()),
        secrets=cls.secrets_model.model_validate(fake.instance_secrets()),
    )
    return cls(config, http)


def delivery(n: int, chat: str, **fields) -> ChannelOutbound:
    fields.setdefault("type", "text")
    return ChannelOutbound(
        delivery_id=f"dlv-{n}",
        idempotency_key=f"dlv-{n}",
        target=ChannelTarget(chat_id=chat, **fields.pop("target", {})),
        **fields,
    )


# --- WhatsApp ------------------------------------------------------------------------------------
async def test_whatsapp_reply_buttons_then_a_list_when_more_than_three(http):
    fake = FakeWhatsApp()
    provider = await rig("whatsapp", fake, http)
    try:
        three = [
            [
                ChannelButton(label=f"Option number {i} with a long title", token=f"t{i}")
                for i in range(3)
            ]
        ]
        await provider.send(delivery(1, "49", type="buttons", text="Pick", buttons=three))
        _, body = fake.calls[-1]
        assert body["interactive"]["type"] == "button"
        assert all(len(b["reply"]["title"]) <= 20 for b in body["interactive"]["action"]["buttons"])
        five = [[ChannelButton(label=f"Row {i}", token=f"r{i}")] for i in range(5)]
        await provider.send(
            delivery(
                2, "49", type="buttons", text="Pick", buttons=five, reply_to_message_id="wamid.IN1"
            )
        )
        _, body = fake.calls[-1]
        assert body["interactive"]["type"] == "list" and body["context"] == {
            "message_id": "wamid.IN1"
        }
        assert [r["id"] for r in body["interactive"]["action"]["sections"][0]["rows"]] == [
            f"r{i}" for i in range(5)
        ]
        eleven = [
            [ChannelButton(label=f"{i}", token=f"{i}") for i in range(j, j + 4)] for j in (0, 4, 8)
        ]  # 12 choices in 3 rows
        with pytest.raises(DeliveryFailed) as caught:
            await provider.send(delivery(3, "49", type="buttons", text="?", buttons=eleven))
        assert caught.value.permanent
        assert await provider.probe() == "phone number +1 555 0100"
    finally:
        await fake.stop()


# --- email ---------------------------------------------------------------------------------------
async def test_email_reply_threads_and_a_resend_keeps_its_message_id(http):
    fake = FakeEmail()
    provider = await rig("email", fake, http)
    try:
        provider.verify(
            request := fake.signed_message(
                "build?", chat_id="ada@example.com", event_id="5", thread_id="root"
            )
        )
        [inbound] = provider.parse(request).messages
        reply = delivery(
            1,
            inbound.target.chat_id,
            text="Green.",
            target={"thread_id": inbound.target.thread_id, "message_id": inbound.target.message_id},
        )
        first = await provider.send(reply)
        again = await provider.send(reply)
        assert first.provider_message_id == again.provider_message_id
        sent = fake.messages[-1]
        assert sent["Subject"] == "Re: Build status"
        assert sent["In-Reply-To"] == "<msg5@mail.example.com>"
        assert sent["References"] == "<root@mail.example.com> <msg5@mail.example.com>"
        assert sent["Message-ID"] == first.provider_message_id
        assert sent["From"] == "bot@cowork.test" and sent["To"] == "ada@example.com"
        assert fake.texts("ada@example.com") == ["Green.", "Green."]
        other = await provider.send(delivery(2, "ada@example.com", text="New topic"))
        assert other.provider_message_id != first.provider_message_id
        assert fake.messages[-1]["In-Reply-To"] is None
    finally:
        await fake.stop()


async def test_email_attachments_and_inline_images_both_ways(http):
    """A relay passing the MIME source: its text part, its attachment and its inline
    image become the message's text and attachments; a file delivery goes out as
    a MIME part, an image inline with a Content-ID."""
    fake = FakeEmail()
    provider = await rig("email", fake, http)
    try:
        source = EmailMessage()
        source["From"], source["To"] = "ada@example.com", "bot@cowork.test"
        source["Message-ID"], source["Subject"] = "<mime1@mail.example.com>", "Logs"
        source.set_content("the logs are attached")
        source.add_related(b"\x89PNG fake", maintype="image", subtype="png", cid="<shot1@x>")
        source.add_attachment(b"line 1\nline 2\n", maintype="text", subtype="plain",
                              filename="build.log")  # fmt: skip
        request = fake.relay_request(
            {"messageId": "<mime1@mail.example.com>", "from": "ada@example.com",
             "raw": source.as_string()}
        )  # fmt: skip
        provider.verify(request)
        [inbound] = provider.parse(request).messages
        assert inbound.text == "the logs are attached"
        files = {(a.filename, a.mime_type, a.size_bytes) for a in inbound.attachments}
        assert files == {(None, "image/png", 9), ("build.log", "text/plain", 14)}
        assert any(a.provider_file_id.endswith("/cid:shot1@x") for a in inbound.attachments)

        png = base64.b64encode(b"\x89PNG image bytes").decode()
        pdf = base64.b64encode(b"%PDF-1.4 fake").decode()
        for n, (name, mime, content) in enumerate(
            [("chart.png", "image/png", png), ("report.pdf", "application/pdf", pdf)]
        ):
            await provider.send(
                delivery(10 + n, "ada@example.com", type="file", text="Here it is",
                         file={"filename": name, "mimeType": mime, "contentBase64": content})
            )  # fmt: skip
        image, document = fake.messages[-2], fake.messages[-1]
        [part] = list(image.iter_attachments())
        assert part.get_content_disposition() == "inline" and part["Content-ID"]
        assert part.get_content() == b"\x89PNG image bytes"
        [part] = list(document.iter_attachments())
        assert part.get_content_disposition() == "attachment"
        assert part.get_filename() == "report.pdf" and part.get_content() == b"%PDF-1.4 fake"
        too_big = base64.b64encode(b"x" * (1024 * 1024 + 1)).decode()
        with pytest.raises(DeliveryFailed):  # over a delivery's file limit: refused before SMTP
            await provider.send(
                delivery(20, "ada@example.com", type="file",
                         file={"filename": "big.bin", "contentBase64": too_big})
            )  # fmt: skip
    finally:
        await fake.stop()


@pytest.mark.parametrize(
    "reply,permanent",
    [
        ("451 4.7.1 Greylisted, try later", False),
        ("421 4.3.2 Service shutting down", False),
        ("550 5.1.1 No such user", True),
        ("554 5.7.1 Rejected as spam", True),
    ],
)
async def test_email_smtp_4xx_is_retryable_and_5xx_permanent(http, reply, permanent):
    fake = FakeEmail()
    provider = await rig("email", fake, http)
    try:
        fake.reply_next(reply)
        with pytest.raises(DeliveryFailed) as caught:
            await provider.send(delivery(1, "ada@example.com", text="hi"))
        assert caught.value.permanent is permanent
        assert caught.value.status == int(reply[:3])
        assert await provider.probe() and fake.calls[-1] == ("noop", None)
    finally:
        await fake.stop()


async def test_email_unreachable_server_is_retryable(http):
    fake = FakeEmail()
    provider = await rig("email", fake, http)
    await fake.stop()
    with pytest.raises(DeliveryFailed) as caught:
        await provider.send(delivery(1, "ada@example.com", text="hi"))
    assert not caught.value.permanent and caught.value.code == "transport.error"
    with pytest.raises(DeliveryFailed):
        await provider.probe()


# --- generic webhook -----------------------------------------------------------------------------
async def test_webhook_delivery_body_and_failures(http):
    fake = FakeWebhook()
    provider = await rig("webhook", fake, http)
    try:
        await provider.send(delivery(1, "room", text="hello", target={"thread_id": "t1"}))
        kind, body = fake.calls[-1]
        assert kind == "text" and fake.rejected == []
        assert {
            k: body[k] for k in ("deliveryId", "idempotencyKey", "provider", "type", "text")
        } == {
            "deliveryId": "dlv-1",
            "idempotencyKey": "dlv-1",
            "provider": "webhook-x",
            "type": "text",
            "text": "hello",
        }
        assert body["target"]["threadId"] == "t1"
        fake.fail_next(503)
        with pytest.raises(DeliveryFailed) as caught:
            await provider.send(delivery(2, "room", text="x"))
        assert not caught.value.permanent
        fake.outbound_secret = "the-receiver-expects-another-secret"
        with pytest.raises(DeliveryFailed) as caught:
            await provider.send(delivery(3, "room", text="x"))
        assert caught.value.permanent and fake.rejected == ["signature"]
    finally:
        await fake.stop()
