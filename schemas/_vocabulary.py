"""The product contract's closed vocabularies, as enums (values are the wire strings)."""

from __future__ import annotations

from enum import Enum


class _Str(str, Enum):
    def __str__(self) -> str:  # f-strings and logs show the wire value
        return self.value


class PrincipalKind(_Str):
    HUB = "hub"
    ADMIN = "admin"
    DESKTOP = "desktop"
    GATEWAY = "gateway"
    CHANNEL = "channel"
    VIEWER = "viewer"


class WorkspaceKind(_Str):
    LOCAL = "local"
    CLOUD = "cloud"
    GATEWAY = "gateway"
    PAIRED_DESKTOP = "paired_desktop"


class WorkspaceStatus(_Str):
    ONLINE = "online"
    OFFLINE = "offline"
    AUTH_REQUIRED = "auth_required"
    DISABLED = "disabled"
    ERROR = "error"


class ExecutionAuthority(_Str):
    DESKTOP_LOCAL = "desktop_local"
    GATEWAY_STANDALONE = "gateway_standalone"
    DESKTOP_PAIRED = "desktop_paired"
    CLOUD_WORKER = "cloud_worker"
    CLOUD_CHANNEL_GATEWAY = "cloud_channel_gateway"


class CapabilityStatus(_Str):
    SUPPORTED = "supported"
    READ_ONLY = "read_only"
    BLOCKED_BY_POLICY = "blocked_by_policy"
    NOT_SUPPORTED = "not_supported"
    DEFERRED = "deferred"


class ReasonCode(_Str):
    AUTH_REQUIRED = "workspace.auth_required"
    OFFLINE_READ_ONLY = "workspace.offline_read_only"
    LOCAL_ONLY = "workspace.local_only"
    CLOUD_ONLY = "workspace.cloud_only"
    POLICY_DISABLED = "workspace.policy_disabled"
    QUOTA_DENIED = "workspace.quota_denied"
    CAPACITY_DENIED = "workspace.capacity_denied"
    BILLING_DENIED = "workspace.billing_denied"
    NOT_SUPPORTED = "workspace.not_supported"
    DEFERRED = "workspace.deferred"
    PAIRING_REQUIRED = "workspace.pairing_required"
    PAIRING_OFFLINE = "workspace.pairing_offline"
    AUTHORITY_MISMATCH = "workspace.authority_mismatch"
    REMOTE_APPROVAL_REQUIRED = "workspace.remote_approval_required"


class PairingStatus(_Str):
    PAIRED_ONLINE = "paired_online"
    PAIRED_OFFLINE = "paired_offline"
    DISABLED = "disabled"
    REVOKED = "revoked"
    ERROR = "error"


class PolicyDecision(_Str):
    DISABLED = "disabled"
    LOCAL_CONFIRMATION = "local_confirmation"
    REMOTE_ALLOWED = "remote_allowed"


class CommandKind(_Str):
    CREATE_SESSION = "create_session"
    PROMPT = "prompt"
    ABORT = "abort"
    PERMISSION_RESPOND = "permission.respond"
    QUESTION_REPLY = "question.reply"
    QUESTION_REJECT = "question.reject"
    STATUS = "status"
    REVOKE_PAIRING = "revoke_pairing"
    CONTROLLER_ENROL = "controller.enrol"
    POLICY_SET = "policy.set"


class CommandStatus(_Str):
    COMPLETED = "completed"
    QUEUED = "queued"
    BLOCKED_BY_POLICY = "blocked_by_policy"
    REQUIRES_LOCAL_CONFIRMATION = "requires_local_confirmation"
    FAILED = "failed"


class DeviceEventType(_Str):
    HEARTBEAT = "heartbeat"
    COMMAND_ACCEPTED = "command.accepted"
    COMMAND_COMPLETED = "command.completed"
    COMMAND_FAILED = "command.failed"
    SESSION_EVENT = "session.event"
    AUDIT = "audit"
    STATUS = "status"


class GatewayKind(_Str):
    EXTERNAL_WORKSPACE = "external_workspace"
    EDGE_WORKER = "edge_worker"
    EXTERNAL_WORKSPACE_EDGE_WORKER = "external_workspace_edge_worker"


class TrustModel(_Str):
    SELF_HOSTED_SAME_OPERATOR = "self_hosted_same_operator"
    SAAS_OPERATOR_MANAGED = "saas_operator_managed"
    CUSTOMER_HOSTED_MANAGED_SAAS_DEFERRED = "customer_hosted_managed_saas_deferred"


class CredentialScope(_Str):
    HEARTBEAT = "gateway.registration.heartbeat"
    CAPABILITIES = "gateway.registration.capabilities"
    METADATA_SYNC = "gateway.registration.metadata_sync"
    EDGE_CLAIM = "gateway.edge.claim"
    EDGE_LEASE_RENEW = "gateway.edge.lease_renew"
    EDGE_WRITE_FENCED_OUTPUT = "gateway.edge.write_fenced_output"


class SyncScope(_Str):
    HEALTH = "health"
    CAPABILITIES = "capabilities"
    REDACTED_SESSION_METADATA = "redacted_session_metadata"
    REDACTED_PROJECTION_SNAPSHOT = "redacted_projection_snapshot"
    WORKFLOW_STATUS = "workflow_status"
    ARTIFACT_METADATA = "artifact_metadata"
    AUDIT_SUMMARY = "audit_summary"
    EVENT_CURSOR = "event_cursor"
    CLOUD_WORK_EVENTS = "cloud_work_events"
    CLOUD_WORK_PROJECTION = "cloud_work_projection"
    CLOUD_WORK_ARTIFACT_METADATA = "cloud_work_artifact_metadata"
    CLOUD_WORK_CHECKPOINT_METADATA = "cloud_work_checkpoint_metadata"


class WorkerState(_Str):
    PENDING = "pending"
    ACTIVE = "active"
    DRAINING = "draining"
    PAUSED = "paused"
    UNHEALTHY = "unhealthy"
    RETIRED = "retired"
    REVOKED = "revoked"


class WorkState(_Str):
    QUEUED = "queued"
    LEASED = "leased"
    COMPLETED = "completed"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    CANCELLED = "cancelled"


class WorkOutputKind(_Str):
    EVENT = "event"
    STATUS = "status"
    RESULT = "result"
    FAIL = "fail"


class DeliveryType(_Str):
    TEXT = "text"
    EDIT = "edit"
    FILE = "file"
    BUTTONS = "buttons"
    ANSWER_INTERACTION = "answer_interaction"
    TYPING = "typing"
    REACTION = "reaction"  # an emoji on the message `target.messageId` names


class DeliveryStatus(_Str):
    SENT = "sent"
    RETRYING = "retrying"
    DEAD_LETTERED = "dead_lettered"
    DUPLICATE = "duplicate"  # already sent before: acknowledged, not sent again


class ChannelKind(_Str):
    TELEGRAM = "telegram"
    SLACK = "slack"
    DISCORD = "discord"
    WHATSAPP = "whatsapp"
    EMAIL = "email"
    WEBHOOK = "webhook"
    CLI = "cli"
    MATRIX = "matrix"
    SIGNAL = "signal"
    TEAMS = "teams"


class ChannelEventType(_Str):
    MESSAGE = "message"
    INTERACTION = "interaction"  # a button press
    COMMAND = "command"  # a platform slash command (Slack, Discord)


class ChannelInstanceState(_Str):
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class ChannelRole(_Str):
    """A chat user's role in a tenant's channels. Only owner/admin/member prompt;
    owner/admin/approver approve; viewer reads; pending is an unknown user."""

    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    APPROVER = "approver"
    VIEWER = "viewer"
    PENDING = "pending"


# --- what each registration kind may do (product contract, "Gateway registration") ---
# Credential scopes derived from the kind; an admin may narrow them, never widen.
SCOPES_BY_KIND: dict[str, frozenset[str]] = {
    GatewayKind.EXTERNAL_WORKSPACE: frozenset(
        {CredentialScope.HEARTBEAT, CredentialScope.CAPABILITIES, CredentialScope.METADATA_SYNC}
    ),
    GatewayKind.EDGE_WORKER: frozenset(
        {
            CredentialScope.HEARTBEAT,
            CredentialScope.CAPABILITIES,
            CredentialScope.EDGE_CLAIM,
            CredentialScope.EDGE_LEASE_RENEW,
            CredentialScope.EDGE_WRITE_FENCED_OUTPUT,
        }
    ),
    GatewayKind.EXTERNAL_WORKSPACE_EDGE_WORKER: frozenset(CredentialScope),
}
EDGE_SCOPES = frozenset(
    {
        CredentialScope.EDGE_CLAIM,
        CredentialScope.EDGE_LEASE_RENEW,
        CredentialScope.EDGE_WRITE_FENCED_OUTPUT,
    }
)
EXTERNAL_SYNC_SCOPES = frozenset(
    {
        SyncScope.HEALTH,
        SyncScope.CAPABILITIES,
        SyncScope.REDACTED_SESSION_METADATA,
        SyncScope.REDACTED_PROJECTION_SNAPSHOT,
        SyncScope.WORKFLOW_STATUS,
        SyncScope.ARTIFACT_METADATA,
        SyncScope.AUDIT_SUMMARY,
        SyncScope.EVENT_CURSOR,
    }
)
# Cloud-owned work output: only ever written under a lease (work.output), never synced.
EDGE_SYNC_SCOPES = frozenset(
    {
        SyncScope.CLOUD_WORK_EVENTS,
        SyncScope.CLOUD_WORK_PROJECTION,
        SyncScope.CLOUD_WORK_ARTIFACT_METADATA,
        SyncScope.CLOUD_WORK_CHECKPOINT_METADATA,
    }
)
FORBIDDEN_SYNC_SCOPES = frozenset(
    {
        "raw_gateway_database",
        "raw_opencode_runtime_home",
        "raw_local_paths",
        "raw_provider_keys",
        "raw_mcp_secrets",
        "raw_channel_secrets",
        "gateway_private_files",
        "cloud_byok_plaintext",
        "unfenced_event_writes",
    }
)
SYNC_SCOPES_BY_KIND: dict[str, frozenset[str]] = {
    GatewayKind.EXTERNAL_WORKSPACE: EXTERNAL_SYNC_SCOPES,
    GatewayKind.EDGE_WORKER: EDGE_SYNC_SCOPES,
    GatewayKind.EXTERNAL_WORKSPACE_EDGE_WORKER: EXTERNAL_SYNC_SCOPES | EDGE_SYNC_SCOPES,
}
# Edge work is refused under this trust model (metadata only).
EDGE_WORK_REFUSED_TRUST = frozenset({TrustModel.CUSTOMER_HOSTED_MANAGED_SAAS_DEFERRED})

_CONSTANTS = [
    "SCOPES_BY_KIND",
    "EDGE_SCOPES",
    "EXTERNAL_SYNC_SCOPES",
    "EDGE_SYNC_SCOPES",
    "FORBIDDEN_SYNC_SCOPES",
    "SYNC_SCOPES_BY_KIND",
    "EDGE_WORK_REFUSED_TRUST",
]

__all__ = _CONSTANTS + sorted(
    name
    for name, value in list(globals().items())
    if isinstance(value, type) and issubclass(value, _Str) and value is not _Str
)
