"""Email provider: inbound from a mail relay's webhook, outbound over SMTP.

Inbound mail arrives from a relay (an inbound-parse service or a small MTA
hook) as JSON with `Authorization: Bearer <relay secret>`. The chat is the
sender's address, the thread is the conversation's root Message-ID (first of
References, else In-Reply-To, else the message itself), and the event id is the
Message-ID, so a relay's retry is deduplicated. Quoted reply text is stripped
from `text` (kept in `rawText`). Outbound is one email per delivery; its
Message-ID derives from the delivery's idempotency key so a resent delivery is
recognisable as the same mail. SMTP 4xx replies are retryable, 5xx permanent.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import OrderedDict
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate
from typing import ClassVar

import aiosmtplib
import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic.alias_generators import to_camel

from schemas import ChannelAttachment, ChannelOutbound, ChannelSender, ChannelTarget, DeliveryType

from .._provider import (
    BadRequest,
    Capabilities,
    DeliveryFailed,
    InstanceConfig,
    ProviderSettings,
    SendResult,
    VerificationFailed,
    WebhookRequest,
    WebhookResult,
)
from ._payload import body_invalid, command_fields, contract_errors, inbound
from ._platform_http import file_bytes

ADDRESS = r"^[^@\s<>]{1,64}@[^@\s<>]{1,255}$"
_MESSAGE_ID = re.compile(r"<[^<>\s]{1,250}>")
_QUOTE_HEADER = re.compile(r"^\s*On .{1,300}wrote:\s*$", re.S)
MAX_TEXT = 16_000  # platforms say 20000; a delivery carries at most 16384
MAX_FILE_BYTES = 1024 * 1024  # what one delivery carries (ChannelFile, ~1 MiB)
_SUBJECT_MEMORY = 1024  # thread subjects remembered for "Re:" lines


class EmailSettings(ProviderSettings):
    smtp_host: str = Field(min_length=1, max_length=255)
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_starttls: bool = True
    from_address: str = Field(pattern=ADDRESS, max_length=320)
    timeout_seconds: float = Field(default=20.0, gt=0, le=120)


class EmailSecrets(ProviderSettings):
    relay_secret: SecretStr = Field(min_length=16, max_length=512)
    smtp_username: str | None = Field(default=None, max_length=320)
    smtp_password: SecretStr | None = Field(default=None, max_length=512)


class _Body(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class _RelayAttachment(_Body):
    filename: str = Field(default="", max_length=512)
    content_type: str = Field(default="application/octet-stream", max_length=128)
    size: int = Field(default=0, ge=0)
    content_id: str | None = Field(default=None, max_length=256)  # an inline image's cid


class _RelayMail(_Body):
    message_id: str = Field(min_length=3, max_length=256)
    from_: str = Field(alias="from", max_length=320)
    to: str | list[str] = Field(default="", max_length=64)
    subject: str = Field(default="", max_length=998)
    text: str = Field(default="", max_length=200_000)
    html: str | None = Field(default=None, max_length=1_000_000)
    in_reply_to: str | None = Field(default=None, max_length=256)
    references: str | list[str] | None = Field(default=None, max_length=8192)
    attachments: list[_RelayAttachment] = Field(default_factory=list, max_length=50)
    # The mail's MIME source, for relays that pass it whole: its text part and its
    # attachments and inline images are read from it (within the body limit).
    raw: str | None = Field(default=None, max_length=2_000_000)


def strip_quoted(text: str) -> str:
    """The new part of a reply: everything before "On ... wrote:" and without
    lines quoted with ">" (how mail clients include the message answered)."""
    lines = text.replace("\r\n", "\n").split("\n")
    kept: list[str] = []
    for index, line in enumerate(lines):
        # The attribution line may wrap onto the next line in some clients.
        if _QUOTE_HEADER.match(line) or (
            line.strip().startswith("On ")
            and index + 1 < len(lines)
            and _QUOTE_HEADER.match(line + " " + lines[index + 1])
        ):
            break
        if line.lstrip().startswith(">"):
            continue
        kept.append(line)
    return "\n".join(kept).strip()


def _address(value: str) -> str:
    match = re.search(r"<([^<>]+)>", value)
    address = (match[1] if match else value).strip().lower()
    if not re.match(ADDRESS, address):
        raise BadRequest("email.body_invalid", "from is not an email address")
    return address


def _ids(value: str | list[str] | None) -> list[str]:
    text = " ".join(value) if isinstance(value, list) else (value or "")
    return _MESSAGE_ID.findall(text)


def _bracketed(value: str) -> str:
    value = value.strip()
    return value if value.startswith("<") else f"<{value}>"


class EmailProvider:
    kind: ClassVar[str] = "email"
    capabilities: ClassVar[Capabilities] = Capabilities(
        threads=True,
        edit=False,
        buttons=None,
        file_upload=True,
        file_download=False,
        typing=False,
        reactions=False,
        max_text_length=MAX_TEXT,
        parse_modes=frozenset({"plain"}),
        max_file_bytes=MAX_FILE_BYTES,
        interaction_ack="none",
        rate_limit="fixed_backoff",
        ephemeral=False,
        verification="relay webhook: Authorization: Bearer <relay secret>",
    )
    settings_model: ClassVar[type[ProviderSettings]] = EmailSettings
    secrets_model: ClassVar[type[ProviderSettings]] = EmailSecrets

    def __init__(self, config: InstanceConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.settings: EmailSettings = config.settings
        self.secrets: EmailSecrets = config.secrets
        self._subjects: OrderedDict[str, str] = OrderedDict()

    # --- inbound ---------------------------------------------------------------------
    def handshake(self, request: WebhookRequest) -> WebhookResult | None:
        return None

    def verify(self, request: WebhookRequest) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise VerificationFailed("email.auth_missing", "Authorization: Bearer is required")
        expected = self.secrets.relay_secret.get_secret_value()
        if not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise VerificationFailed("email.auth_invalid", "the relay secret does not match")

    @contract_errors
    def parse(self, request: WebhookRequest) -> WebhookResult:
        try:
            mail = _RelayMail.model_validate_json(request.body)
        except ValidationError as exc:
            raise body_invalid("email.body_invalid", exc) from None
        own = _ids(mail.message_id)
        if not own:
            raise BadRequest("email.body_invalid", "messageId must look like <id@host>")
        mid = own[0]
        sender = _address(mail.from_)
        thread = (_ids(mail.references) or _ids(mail.in_reply_to) or [mid])[0]
        self._remember_subject(thread, mail.subject)
        if mail.raw:
            mail = _from_mime(mail)
        raw_text = mail.text[:16_384]
        text = strip_quoted(raw_text)
        attachments = [
            ChannelAttachment(
                provider_file_id=f"{mid}/cid:{a.content_id}" if a.content_id else f"{mid}/{i}",
                filename=a.filename or None,
                mime_type=a.content_type,
                size_bytes=a.size,
            )
            for i, a in enumerate(mail.attachments)
        ]
        message = inbound(
            self.config,
            request,
            event_type="message",
            provider_event_id=mid,
            provider_message_id=mid,
            **command_fields(text),
            target=ChannelTarget(
                chat_id=sender, is_direct=True, thread_id=thread, user_id=sender, message_id=mid
            ),
            sender=ChannelSender(provider_user_id=sender, display_name=_display_name(mail.from_)),
            text=text,
            raw_text=raw_text,
            attachments=attachments,
        )
        return WebhookResult(
            messages=[message], status=200, body=b'{"ok":true}', content_type="application/json"
        )

    def _remember_subject(self, thread: str, subject: str) -> None:
        if not subject:
            return
        self._subjects[thread] = re.sub(r"^(\s*(re|aw|fw|fwd):\s*)+", "", subject, flags=re.I)
        self._subjects.move_to_end(thread)
        while len(self._subjects) > _SUBJECT_MEMORY:
            self._subjects.popitem(last=False)

    # --- outbound --------------------------------------------------------------------
    def compose(self, delivery: ChannelOutbound) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.settings.from_address
        message["To"] = delivery.target.chat_id
        thread = delivery.target.thread_id
        subject = self._subjects.get(thread) if thread else None
        message["Subject"] = f"Re: {subject}" if subject else "Message from your workspace"
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = self.message_id_for(delivery)
        answered = delivery.reply_to_message_id or delivery.target.message_id
        references = [_bracketed(i) for i in (thread, answered) if i]
        if answered:
            message["In-Reply-To"] = _bracketed(answered)
        if references:
            message["References"] = " ".join(dict.fromkeys(references))
        message.set_content(delivery.text or "")
        if delivery.type == DeliveryType.FILE:
            _attach(message, delivery)
        return message

    def message_id_for(self, delivery: ChannelOutbound) -> str:
        digest = hashlib.sha256(delivery.idempotency_key.encode()).hexdigest()[:32]
        domain = self.settings.from_address.rsplit("@", 1)[1]
        return f"<cowork.{digest}@{domain}>"

    async def send(self, delivery: ChannelOutbound) -> SendResult:
        # Buttons are the renderer's to turn into text fallbacks (/approve <t>, ...).
        if delivery.type not in (DeliveryType.TEXT, DeliveryType.FILE):
            raise DeliveryFailed(
                f"email cannot {delivery.type.value}", code="delivery.unsupported", permanent=True
            )
        if delivery.type == DeliveryType.FILE and not delivery.text:
            delivery = delivery.model_copy(update={"text": "A file from your workspace."})
        if not (delivery.text or "").strip() or len(delivery.text or "") > MAX_TEXT:
            raise DeliveryFailed(
                f"email: the text is empty or longer than {MAX_TEXT}",
                code="delivery.invalid",
                permanent=True,
            )
        if not re.match(ADDRESS, delivery.target.chat_id):
            raise DeliveryFailed(
                "email: the chat is not an address", code="delivery.invalid", permanent=True
            )
        message = self.compose(delivery)
        async with self._smtp("email send") as smtp:
            await smtp.send_message(message)
        return SendResult(provider_message_id=message["Message-ID"])

    async def probe(self) -> str:
        async with self._smtp("email probe") as smtp:
            await smtp.noop()
        return f"SMTP {self.settings.smtp_host}:{self.settings.smtp_port} answered"

    def _smtp(self, operation: str) -> _Session:
        s, secrets = self.settings, self.secrets
        client = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            timeout=s.timeout_seconds,
            start_tls=s.smtp_starttls,
            use_tls=False,
            username=secrets.smtp_username,
            password=secrets.smtp_password.get_secret_value() if secrets.smtp_password else None,
        )
        return _Session(client, operation)


class _Session:
    """An SMTP connection for one operation whose failures become DeliveryFailed."""

    def __init__(self, client: aiosmtplib.SMTP, operation: str) -> None:
        self.client, self.operation = client, operation

    async def __aenter__(self) -> aiosmtplib.SMTP:
        try:
            await self.client.connect()
        except Exception as exc:  # noqa: BLE001 - every connect failure maps to one error
            raise _failure(self.operation, exc) from None
        return self.client

    async def __aexit__(self, kind, exc, tb) -> bool:
        try:
            await self.client.quit()
        except (aiosmtplib.SMTPException, OSError):
            self.client.close()  # the server went away; nothing left to say goodbye to
        if exc is not None and not isinstance(exc, DeliveryFailed):
            if isinstance(exc, (aiosmtplib.SMTPException, OSError)):
                raise _failure(self.operation, exc) from None
        return False


def _failure(operation: str, exc: BaseException) -> DeliveryFailed:
    code = getattr(exc, "code", None)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        code = exc.recipients[0].code
    if isinstance(code, int) and 500 <= code < 600:
        return DeliveryFailed(
            f"{operation}: refused by the SMTP server ({code})",
            code="smtp.rejected",
            permanent=True,
            status=code,
        )
    if isinstance(code, int) and 400 <= code < 500:
        return DeliveryFailed(
            f"{operation}: deferred by the SMTP server ({code})", code="smtp.deferred", status=code
        )
    return DeliveryFailed(
        f"{operation}: cannot reach the SMTP server ({type(exc).__name__})", code="transport.error"
    )


def _display_name(value: str) -> str | None:
    name = value.split("<", 1)[0].strip().strip('"') if "<" in value else ""
    return name[:512] or None


def _from_mime(mail: _RelayMail) -> _RelayMail:
    """The relay's fields completed from the MIME source: the plain text part (when
    the relay gave none) and every attachment and inline image part."""
    try:
        parsed = BytesParser(policy=policy.default).parsebytes((mail.raw or "").encode())
    except Exception:  # the stdlib parser is lenient; anything it raises is a bad body
        raise BadRequest("email.body_invalid", "raw is not a MIME message") from None
    assert isinstance(parsed, EmailMessage)
    text = mail.text
    if not text:
        body = parsed.get_body(preferencelist=("plain",))
        text = str(body.get_content()) if body is not None else ""
    found = list(mail.attachments)
    for part in parsed.walk():
        if part.is_multipart() or len(found) >= 50:
            continue
        disposition = part.get_content_disposition()
        content_id = (part.get("Content-ID") or "").strip("<> ") or None
        if disposition != "attachment" and not (
            content_id and part.get_content_maintype() == "image"
        ):
            continue  # a body part, not an attachment or an inline image
        payload = part.get_payload(decode=True) or b""
        found.append(
            _RelayAttachment(
                filename=(part.get_filename() or "")[:512],
                content_type=part.get_content_type()[:128],
                size=len(payload),
                content_id=content_id[:256] if content_id else None,
            )
        )
    return mail.model_copy(update={"text": text, "attachments": found})


def _attach(message: EmailMessage, delivery: ChannelOutbound) -> None:
    """A file delivery's file as a MIME part: an image inline (shown in the mail,
    with a Content-ID), anything else as an attachment."""
    file, content = file_bytes(delivery, MAX_FILE_BYTES)
    maintype, _, subtype = file.mime_type.partition("/")
    if not subtype:
        maintype, subtype = "application", "octet-stream"
    inline = maintype == "image"
    message.add_attachment(
        content,
        maintype=maintype,
        subtype=subtype,
        filename=file.filename,
        disposition="inline" if inline else "attachment",
        cid=f"<{hashlib.sha256(content).hexdigest()[:24]}@cowork>" if inline else None,
    )
