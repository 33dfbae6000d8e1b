"""Message bodies, one class per wire type. Field names follow the product contract."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, Field, StrictBool, model_validator

from ._base import Message, WireModel
from ._sealed import ControllerEnrolPayload, SealedContent, SignedCommand
from ._tokens import TenantId, TokenId
from ._vocabulary import (
    CapabilityStatus,
    ChannelEventType,
    ChannelKind,
    CommandKind,
    CommandStatus,
    CredentialScope,
    DeliveryStatus,
    DeliveryType,
    DeviceEventType,
    GatewayKind,
    PolicyDecision,
    PrincipalKind,
    WorkerState,
    WorkOutputKind,
)

Text = Annotated[str, Field(max_length=16_384)]


def _at_most_512_bytes(value: str) -> str:
    if len(value.encode("utf-8", "surrogatepass")) > 512:
        raise ValueError("at most 512 bytes of UTF-8")
    return value


# PostgreSQL's label columns check octet_length <= 512: so does the contract
Label = Annotated[str, Field(max_length=512), AfterValidator(_at_most_512_bytes)]
NkeyPublic = Annotated[str, Field(pattern=r"^U[A-Z2-7]{55}$")]  # an nkey *user* public key
Json = dict[str, Any]
ReplyKeyText = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{43}$")]  # X25519, base64url


# --- generic replies -----------------------------------------------------------
class AckReply(Message):
    """The reply to a request that only needs an outcome."""

    message_type = "ack.reply"
    ok: bool
    code: str | None = Field(default=None, max_length=128)
    reason: Text | None = None
    retry_after_seconds: float | None = Field(default=None, ge=0)


# --- pairing and credentials ------------------------------------------------------
class PairingRedeemRequest(Message):
    """Sent with the public bootstrap identity; the reply is sealed to `reply_key`."""

    message_type = "pairing.redeem.request"
    code: str = Field(min_length=4, max_length=32)
    public_key: NkeyPublic
    reply_key: ReplyKeyText
    device_name: Label
    client_version: str = Field(max_length=64)


class SealedReply(Message):
    """A bootstrap reply encrypted to the requester's `reply_key` (see schemas._bootstrap);
    inside is the JSON of an envelope (e.g. a `pairing.redeem.reply`)."""

    message_type = "bootstrap.sealed_reply"
    sealed: str = Field(max_length=65_536)


class PairingPolicy(WireModel):
    """The Desktop's remote-control policy (product contract defaults)."""

    allow_remote_prompts: bool = True
    allow_remote_abort: bool = True
    remote_approvals: PolicyDecision = PolicyDecision.LOCAL_CONFIRMATION
    remote_questions: PolicyDecision = PolicyDecision.LOCAL_CONFIRMATION
    expose_artifact_bodies: bool = False
    expose_local_paths: bool = False
    expose_local_mcp_details: bool = False
    allow_remote_attachments: bool = False


AllowList = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=128)
]


class PairingState(Message):
    """What a Desktop needs to enforce its pairing: sent at redemption, whenever the
    pairing changes, and when the Desktop comes online. `revision` only grows."""

    message_type = "pairing.state"
    pairing_id: TokenId
    revision: int = Field(ge=1)
    enabled: bool
    revoked: bool = False
    allowed_workspace_ids: AllowList
    allowed_session_ids: AllowList | None = None
    policy: PairingPolicy = Field(default_factory=PairingPolicy)


class PairingRedeemReply(Message):
    message_type = "pairing.redeem.reply"
    pairing_id: TokenId
    tenant: TenantId
    label: Label
    user_jwt: str = Field(max_length=8192)
    expires_at: datetime
    state: PairingState


class PairingRevokeNotice(Message):
    message_type = "pairing.revoke.notice"
    pairing_id: TokenId
    reason: Label | None = None
    revoked_at: datetime


class CredentialRefreshRequest(Message):
    message_type = "auth.refresh.request"
    public_key: NkeyPublic


class CredentialRefreshReply(Message):
    message_type = "auth.refresh.reply"
    user_jwt: str = Field(max_length=8192)
    expires_at: datetime


# --- device commands and events ------------------------------------------------------
class Lease(WireModel):
    leased_by: TokenId
    lease_token: str = Field(min_length=16, max_length=128)
    lease_expires_at: datetime


class DeviceCommand(Message):
    message_type = "device.command"
    id: TokenId
    kind: CommandKind
    pairing_id: TokenId
    workspace_id: TokenId
    session_id: TokenId | None = None
    actor_id: Label | None = None
    actor_label: Label | None = None
    payload: Json | None = None
    sequence: int = Field(ge=1)
    created_at: datetime
    lease: Lease
    signed: SignedCommand | None = Field(
        default=None, description="A controller's signed command (sealed pairings)"
    )


# Command payloads, one model per kind (kinds absent here take no payload).
class Attachment(WireModel):
    mime: str = Field(min_length=1, max_length=128)
    url: str = Field(min_length=1, max_length=8192)
    filename: str | None = Field(default=None, max_length=512)


class CreateSessionPayload(WireModel):
    title: Label | None = None
    agent: str | None = Field(default=None, max_length=128)


class PromptPayload(WireModel):
    text: Text = Field(min_length=1)
    agent: str | None = Field(default=None, max_length=128)
    variant: str | None = Field(default=None, max_length=128)
    attachments: list[Attachment] = Field(default_factory=list, max_length=16)


class PermissionRespondPayload(WireModel):
    permission_id: str = Field(min_length=1, max_length=256)
    # Only a literal JSON true allows (product contract): no "yes", no 1.
    allowed: StrictBool


class QuestionReplyPayload(WireModel):
    request_id: str = Field(min_length=1, max_length=256)
    answers: list[list[Annotated[str, Field(max_length=4096)]]] = Field(min_length=1, max_length=64)


class QuestionRejectPayload(WireModel):
    request_id: str = Field(min_length=1, max_length=256)


class PolicySetPayload(WireModel):
    """A sealed Desktop's policy and allowlists, changed by an enrolled controller: a
    `policy.set` command is run only when it is signed (on a sealed pairing the hub's
    PATCH no longer changes them). A field left out stays as it is, in `policy` too
    (only the policy fields given change); `allowedSessionIds` given as null lifts
    the session allowlist."""

    policy: PairingPolicy | None = None
    allowed_workspace_ids: AllowList | None = None
    allowed_session_ids: AllowList | None = None


COMMAND_PAYLOADS: dict[str, type[WireModel]] = {
    "create_session": CreateSessionPayload,
    "prompt": PromptPayload,
    "permission.respond": PermissionRespondPayload,
    "question.reply": QuestionReplyPayload,
    "question.reject": QuestionRejectPayload,
    "controller.enrol": ControllerEnrolPayload,
    "policy.set": PolicySetPayload,
}
NEEDS_SESSION = frozenset(
    {"prompt", "abort", "permission.respond", "question.reply", "question.reject"}
)


def command_payload(kind: str, session_id: str | None, payload: Json | None) -> WireModel | None:
    """The typed payload of a command, or ValueError saying what is wrong."""
    if kind not in {k.value for k in CommandKind}:
        raise ValueError(f"unknown command kind {kind!r}")
    if kind in NEEDS_SESSION and not session_id:
        raise ValueError(f"{kind} needs a sessionId")
    model = COMMAND_PAYLOADS.get(kind)
    if model is None:
        if payload:
            raise ValueError(f"{kind} takes no payload")
        return None
    return model.model_validate(payload or {})


class CommandResult(WireModel):
    ok: bool
    status: CommandStatus
    code: str | None = Field(
        default=None, max_length=128, description="Why the Desktop refused it, e.g. sealed.replayed"
    )
    sealed: SealedContent | None = Field(
        default=None, description="On a sealed pairing: the result's content, encrypted"
    )
    session: Json | None = None
    sessions: list[Json] | None = None
    message: Text | None = None
    data: Json | None = None
    # Paired Desktops never invent a projection fence (product contract).
    projection_fence: None = None
    reason: Literal["desktop_pairing_projection_fence_unsupported"] = (
        "desktop_pairing_projection_fence_unsupported"
    )


class CommandAck(Message):
    message_type = "device.command_ack"
    command_id: TokenId
    pairing_id: TokenId
    sequence: int = Field(ge=1)
    lease_token: str = Field(min_length=16, max_length=128)
    outcome: Literal["accepted", "completed", "failed"]
    result: CommandResult | None = None


class DeviceEvent(Message):
    message_type = "device.event"
    id: TokenId
    pairing_id: TokenId
    type: DeviceEventType
    workspace_id: TokenId | None = None
    session_id: TokenId | None = None
    command_id: TokenId | None = None
    sequence: int | None = Field(default=None, ge=0)
    occurred_at: datetime
    payload: Json | None = None


# --- presence ----------------------------------------------------------------------------
class PresenceHeartbeat(Message):
    message_type = "presence.heartbeat"
    principal_kind: PrincipalKind
    principal_id: TokenId
    sequence: int = Field(ge=0)
    interval_seconds: float = Field(gt=0, le=3600)
    status: Literal["online", "offline"] = "online"
    version: str | None = Field(default=None, max_length=64)
    trust: Literal["hub", "sealed"] | None = Field(
        default=None, description="A Desktop's trust mode, as it reports it (docs/sealed.md)"
    )


# --- gateway registration -----------------------------------------------------------------
class VersionSet(WireModel):
    product: str = Field(max_length=64)
    opencode: str = Field(max_length=64)
    bus_protocol: str = Field(max_length=64)
    event_contract: str = Field(max_length=64)
    projection_contract: str = Field(max_length=64)
    checkpoint_schema: str = Field(max_length=64)


class GatewayRegisterRequest(Message):
    message_type = "gateway.register.request"
    credential: str = Field(min_length=16, max_length=256)
    public_key: NkeyPublic
    reply_key: ReplyKeyText
    versions: VersionSet


class GatewayRegisterReply(Message):
    message_type = "gateway.register.reply"
    registration_id: TokenId
    tenant: TenantId
    display_name: Label
    kind: GatewayKind
    scopes: list[CredentialScope]
    sync_scopes: list[TokenId]
    user_jwt: str = Field(max_length=8192)
    expires_at: datetime
    state: WorkerState
    heartbeat_interval_seconds: float = Field(default=5.0, gt=0, le=3600)


class GatewayHeartbeat(Message):
    message_type = "gateway.heartbeat"
    liveness: Literal["alive", "stopping"]
    mode: WorkerState
    health: Literal["healthy", "degraded", "unhealthy"]
    current_load: int = Field(ge=0)
    active_work_ids: list[TokenId] = Field(max_length=1024)
    heartbeat_sequence: int = Field(ge=0)
    interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    last_error: Text | None = None
    versions: VersionSet | None = None


class GatewayHeartbeatReply(Message):
    """The hub's view of the registration after a heartbeat: a Gateway that is not
    `active` stops claiming (draining keeps renewing until `drain_deadline`)."""

    message_type = "gateway.heartbeat.reply"
    state: WorkerState
    reason: Text | None = None
    drain_deadline: datetime | None = None


class GatewayCapabilities(Message):
    message_type = "gateway.capabilities"
    capabilities: dict[TokenId, CapabilityStatus]
    max_concurrent_work: int = Field(ge=0, le=10_000)
    work_kinds: list[TokenId] = Field(default_factory=list, max_length=64)


class GatewaySync(Message):
    """External-workspace metadata. `scope` is a plain token so that a forbidden or
    unknown scope gets a refusal with its reason rather than a contract error."""

    message_type = "gateway.sync"
    scope: TokenId
    items: list[Json] = Field(max_length=1000)
    cursor: str | None = Field(default=None, max_length=256)


# --- Cloud-owned edge work -------------------------------------------------------------------
class SessionRef(WireModel):
    """Which Cloud workspace (and session, when continuing one) the work belongs to."""

    workspace_id: TokenId
    session_id: TokenId | None = None
    title: Label | None = None


class WorkRequirements(WireModel):
    """What the work needs from the edge that runs it; a claim only matches work
    whose requirements the registration meets."""

    capabilities: list[TokenId] = Field(default_factory=list, max_length=64)
    credentials: list[TokenId] = Field(default_factory=list, max_length=64)
    host_paths: bool = False
    local_stdio_mcps: bool = False


class WorkOffer(Message):
    message_type = "work.offer"
    work_id: TokenId
    kind: TokenId
    requirements: WorkRequirements = Field(default_factory=WorkRequirements)


class WorkClaimRequest(Message):
    message_type = "work.claim.request"
    work_kinds: list[TokenId] = Field(default_factory=lambda: ["prompt"], max_length=64)
    work_id: TokenId | None = Field(default=None, description="Prefer this offered item")
    claim_id: UUID | None = Field(
        default=None,
        description=(
            "New for each claim attempt and the same on its retries: the hub records the "
            "lease it grants under it (for an hour), and a retry with the same claimId is "
            "answered with that lease (or none if it has ended), never a second one"
        ),
    )


class WorkClaimReply(Message):
    """A lease on one work item, or `work_id: null` when nothing is claimable.
    `next_sequence` is where this lease's outputs continue (after earlier attempts')."""

    message_type = "work.claim.reply"
    work_id: TokenId | None = None
    kind: TokenId | None = None
    lease_token: str | None = Field(default=None, max_length=128)
    lease_expires_at: datetime | None = None
    lease_seconds: float | None = Field(default=None, gt=0)
    attempt: int | None = Field(default=None, ge=1)
    next_sequence: int | None = Field(default=None, ge=1)
    session_ref: SessionRef | None = None
    payload: Json | None = None


class WorkRenew(Message):
    message_type = "work.renew"
    work_id: TokenId
    lease_token: str = Field(min_length=16, max_length=128)


class WorkRenewReply(Message):
    message_type = "work.renew.reply"
    work_id: TokenId
    lease_expires_at: datetime


class WorkOutput(Message):
    """A lease-fenced write. Sequences are per work item across all its attempts;
    re-sending a stored sequence with identical content is a no-op."""

    message_type = "work.output"
    work_id: TokenId
    lease_token: str = Field(min_length=16, max_length=128)
    kind: WorkOutputKind
    sequence: int = Field(ge=1)
    body: Json


# --- workspace live tail --------------------------------------------------------------------
class WorkspaceEvent(Message):
    message_type = "workspace.event"
    workspace_id: TokenId
    sequence: int = Field(ge=1)
    event_id: TokenId | None = None
    type: str = Field(max_length=128)
    session_id: TokenId | None = None
    command_id: TokenId | None = None
    occurred_at: datetime
    payload: Json | None = None


# --- channels ----------------------------------------------------------------------------------
class ChannelTarget(WireModel):
    chat_id: str = Field(max_length=256)
    is_direct: bool = False
    thread_id: str | None = Field(default=None, max_length=256)
    user_id: str | None = Field(default=None, max_length=256)
    message_id: str | None = Field(default=None, max_length=256)


class ChannelSender(WireModel):
    provider_user_id: str = Field(max_length=256)
    username: str | None = Field(default=None, max_length=256)
    display_name: str | None = Field(default=None, max_length=512)
    is_bot: bool = False


class ChannelAttachment(WireModel):
    provider_file_id: str = Field(max_length=512)
    download_url: str | None = Field(default=None, max_length=2048)
    filename: str | None = Field(default=None, max_length=512)
    mime_type: str | None = Field(default=None, max_length=128)
    size_bytes: int | None = Field(default=None, ge=0)


class ChannelInteraction(WireModel):
    """A button press or a platform slash command. `token` is the button's opaque
    token (hashed and single-use at the hub); `response_token` is what the
    platform needs to answer the interaction (Discord interaction token, Telegram
    callback query id, Slack response_url)."""

    id: str = Field(max_length=256)
    token: str = Field(max_length=2048)
    kind: Literal["button", "command"]
    response_token: str | None = Field(default=None, max_length=2048)


class ChannelInbound(Message):
    """One normalised inbound event. `(tenant, provider, event_type, provider_event_id)`
    is the durable dedupe key; `id` is derived from it, so a platform's retry of
    the same event carries the same id (and the same JetStream `Nats-Msg-Id`)."""

    message_type = "channel.inbound"
    id: TokenId
    event_type: ChannelEventType = ChannelEventType.MESSAGE
    provider_event_id: str = Field(min_length=1, max_length=256)
    provider_message_id: str | None = Field(default=None, max_length=256)
    provider: TokenId
    provider_kind: ChannelKind
    workspace_id: TokenId
    target: ChannelTarget
    sender: ChannelSender
    text: Text = ""
    raw_text: Text = ""
    is_command: bool = False
    command: str | None = Field(default=None, max_length=64)
    command_args: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=64
    )
    attachments: list[ChannelAttachment] = Field(default_factory=list, max_length=50)
    interaction: ChannelInteraction | None = None
    received_at: datetime


class ChannelButton(WireModel):
    label: str = Field(max_length=256)
    token: str = Field(max_length=2048)
    style: Literal["default", "danger", "success"] = "default"


class ChannelFile(WireModel):
    filename: str = Field(min_length=1, max_length=512)
    mime_type: str = Field(default="application/octet-stream", max_length=128)
    content_base64: str = Field(max_length=1_400_000)  # ~1 MiB of content


class ChannelOutbound(Message):
    """A delivery for one instance. Deliveries of one lane (instance + chat +
    thread) are sent in order; `delivery_id` makes a re-served delivery a no-op.
    An edit names the message to change by provider id when the hub knows it, or
    by the delivery that sent it (`edit_of_delivery_id`) when it does not yet."""

    message_type = "channel.outbound"
    delivery_id: TokenId
    idempotency_key: str = Field(max_length=256)
    type: DeliveryType
    target: ChannelTarget
    text: Text | None = None
    parse_mode: Literal["plain", "markdown", "html"] = "plain"
    edit_message_id: str | None = Field(default=None, max_length=256)
    edit_of_delivery_id: TokenId | None = None
    reply_to_message_id: str | None = Field(default=None, max_length=256)
    buttons: list[list[ChannelButton]] | None = Field(default=None, max_length=10)
    interaction: ChannelInteraction | None = None
    file: ChannelFile | None = None
    # type reaction: the emoji put on the message `target.message_id` names
    reaction: str | None = Field(default=None, min_length=1, max_length=32)
    silent: bool = False
    notice: bool = False  # a hub notice (e.g. "could not deliver"): never noticed about again

    @model_validator(mode="after")
    def _reaction_is_complete(self) -> ChannelOutbound:
        if self.type == DeliveryType.REACTION:
            if not self.reaction or not self.target.message_id:
                raise ValueError(
                    "a reaction names its emoji (reaction) and the message it "
                    "reacts to (target.messageId)"
                )
        elif self.reaction is not None:
            raise ValueError(f"reaction is only for deliveries of type reaction, not {self.type}")
        return self


class ChannelReceipt(Message):
    message_type = "channel.receipt"
    delivery_id: TokenId
    status: DeliveryStatus
    target: ChannelTarget | None = None
    provider_message_id: str | None = Field(default=None, max_length=256)
    provider_message_ids: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list, max_length=64
    )  # one per chunk
    attempts: int = Field(ge=1)
    code: str | None = Field(default=None, max_length=128)
    error: Text | None = None
    retry_after_seconds: float | None = Field(default=None, ge=0)


# --- audit and dead letters -----------------------------------------------------------------------
class AuditRecord(Message):
    message_type = "audit.record"
    action: str = Field(pattern=r"^[a-z_]+(\.[a-z_]+)+$", max_length=128)
    actor_kind: PrincipalKind
    actor_id: str = Field(max_length=256)
    actor_label: Label | None = None
    target_kind: str | None = Field(default=None, max_length=64)
    target_id: str | None = Field(default=None, max_length=256)
    workspace_id: TokenId | None = None
    session_id: TokenId | None = None
    command_id: TokenId | None = None
    reason: Text | None = None
    metadata: Json = Field(default_factory=dict)


class DeadLetter(Message):
    message_type = "deadletter"
    reason: Text
    code: str = Field(max_length=128)
    original_subject: str = Field(max_length=512)
    original_payload: Text = Field(description="The original bytes, UTF-8 or base64, cut at 16 KiB")
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    attempts: int = Field(default=1, ge=1)


__all__ = sorted(
    name
    for name, value in list(globals().items())
    if isinstance(value, type) and issubclass(value, WireModel) and value.__module__ == __name__
) + ["AllowList", "Label", "COMMAND_PAYLOADS", "NEEDS_SESSION", "command_payload"]
