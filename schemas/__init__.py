"""The bus contract: the envelope, the subject taxonomy and every message model.

This package does no I/O and imports nothing else of this project. Subjects are
in `schemas.subjects`; the JSON Schema / AsyncAPI generators in `schemas.docs`.
"""

from . import _messages, _vocabulary, subjects
from ._base import Message, WireModel
from ._catalog import MESSAGES, message_model
from ._envelope import ContractError, Envelope, Source, decode, new_id, utc_now
from ._messages import (
    AckReply,
    AllowList,
    Label,
    Attachment,
    AuditRecord,
    COMMAND_PAYLOADS,
    ChannelAttachment,
    ChannelButton,
    ChannelFile,
    ChannelInbound,
    ChannelInteraction,
    ChannelOutbound,
    ChannelReceipt,
    ChannelSender,
    ChannelTarget,
    CommandAck,
    CommandResult,
    CreateSessionPayload,
    CredentialRefreshReply,
    CredentialRefreshRequest,
    DeadLetter,
    DeviceCommand,
    DeviceEvent,
    GatewayCapabilities,
    GatewayHeartbeat,
    GatewayHeartbeatReply,
    GatewayRegisterReply,
    GatewayRegisterRequest,
    GatewaySync,
    Lease,
    NEEDS_SESSION,
    PairingPolicy,
    PairingRedeemReply,
    PairingRedeemRequest,
    PairingRevokeNotice,
    PairingState,
    PermissionRespondPayload,
    PresenceHeartbeat,
    PromptPayload,
    QuestionRejectPayload,
    QuestionReplyPayload,
    SealedReply,
    SessionRef,
    VersionSet,
    WorkClaimReply,
    WorkClaimRequest,
    WorkOffer,
    WorkOutput,
    WorkRenew,
    WorkRenewReply,
    WorkRequirements,
    WorkspaceEvent,
    command_payload,
)
from ._tokens import InvalidTokenError, TenantId, TokenId, check_tenant, check_token
from ._vocabulary import (
    CapabilityStatus,
    ChannelEventType,
    ChannelInstanceState,
    ChannelKind,
    ChannelRole,
    CommandKind,
    CommandStatus,
    CredentialScope,
    DeliveryStatus,
    DeliveryType,
    DeviceEventType,
    EDGE_SCOPES,
    EDGE_SYNC_SCOPES,
    EDGE_WORK_REFUSED_TRUST,
    EXTERNAL_SYNC_SCOPES,
    ExecutionAuthority,
    FORBIDDEN_SYNC_SCOPES,
    GatewayKind,
    PairingStatus,
    PolicyDecision,
    PrincipalKind,
    ReasonCode,
    SCOPES_BY_KIND,
    SYNC_SCOPES_BY_KIND,
    SyncScope,
    TrustModel,
    WorkOutputKind,
    WorkState,
    WorkerState,
    WorkspaceKind,
    WorkspaceStatus,
)

__all__ = [*_messages.__all__, *_vocabulary.__all__,
    "subjects", "Message", "WireModel", "MESSAGES", "message_model",
    "ContractError", "Envelope", "Source", "decode", "new_id", "utc_now",
    "InvalidTokenError", "TenantId", "TokenId", "check_tenant", "check_token",
]
from ._secrets import SECRET_KEY, SECRET_REDACTED, is_secret_key, scrub_secrets, scrub_text

__all__ += ["SECRET_KEY", "SECRET_REDACTED", "is_secret_key", "scrub_secrets", "scrub_text"]
from ._creds import nats_conf_string, parse_creds, render_creds
from ._messages import NkeyPublic

__all__ += ["nats_conf_string", "parse_creds", "render_creds", "NkeyPublic"]
from . import _versions as versions

__all__ += ["versions"]
from ._envelope import EnvelopeTemplate

__all__ += ["EnvelopeTemplate"]
from ._bootstrap import (
    BOOTSTRAP_ACCOUNT_PUBLIC,
    BOOTSTRAP_SUBJECTS,
    BOOTSTRAP_USER_JWT,
    BOOTSTRAP_USER_SEED,
    ReplyKey,
    SealError,
    bootstrap_creds,
    seal,
)

__all__ += ["BOOTSTRAP_ACCOUNT_PUBLIC", "BOOTSTRAP_SUBJECTS", "BOOTSTRAP_USER_JWT",
            "BOOTSTRAP_USER_SEED", "ReplyKey", "SealError", "bootstrap_creds", "seal"]
from ._storable import UNSTORABLE_CODE, storable_text, unstorable, unstorable_json

__all__ += ["UNSTORABLE_CODE", "storable_text", "unstorable", "unstorable_json"]
