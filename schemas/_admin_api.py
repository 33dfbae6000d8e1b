"""Answers of the admin HTTP API that the OpenAPI document (`hub.http`) describes
(the requests are in `_admin_requests`), as the hub's routes give them: the health center, dead letters, pairings and
their commands, Gateways, channels, bus credentials, edge work, workspace events.

Every answer is a model here; a value the hub does not shape (an event's payload,
a platform's settings) is declared free-form on purpose, with `FreeObject` or
`FreeValue` (`x-free-form` in the JSON Schema): a test fails on any other untyped
object in docs/openapi.json."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, RootModel, WithJsonSchema

from ._base import WireModel

FREE_FORM = "x-free-form"
# A JSON object whose keys and values the hub does not shape (settings, details).
FreeObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "additionalProperties": True, FREE_FORM: True}),
]
# Any JSON value the hub passes through as it came (a payload, a result).
FreeValue = Annotated[Any, WithJsonSchema({FREE_FORM: True})]

HealthState = Literal["ready", "action_required", "degraded", "offline", "unknown"]


class HealthComponent(WireModel):
    name: str = Field(description="e.g. nats, postgres, stream.CW_AUDIT, loop.presence.sweep")
    group: str = Field(description="nats, postgres, jetstream, streams, consumers, ...")
    state: HealthState
    reason: str = Field(description="What is wrong (or that nothing is)")
    fix: str = Field(default="", description="What to do about it")
    details: FreeObject = Field(default_factory=dict)


class HealthReport(WireModel):
    state: HealthState = Field(description="The worst state of any component")
    checked_at: str
    components: list[HealthComponent]


class DeadLetterView(WireModel):
    sequence: int = Field(description="Its sequence in CW_DEADLETTER: how to name it")
    subject: str
    origin: str = Field(description="The subject family it was set aside from")
    stored_at: str | None = None
    code: str
    reason: str
    original_subject: str | None = None
    original_payload: str | None = Field(
        default=None, description="The message as it came, UTF-8 or base64 (payloadEncoding)"
    )
    payload_encoding: Literal["utf-8", "base64"] | None = None
    attempts: int | None = None
    replayable: bool | None = None


class DeadLetterPage(WireModel):
    items: list[DeadLetterView]
    next_after: int | None = Field(description="Pass as `after` for the next page; null: last")


class DeadLetterReplayed(WireModel):
    sequence: int
    original_subject: str
    replayed: bool = True


class PairingCreated(WireModel):
    pairing_id: str
    code: str = Field(description="The one-time code; shown once")
    expires_at: str
    hub: list[str] = Field(description="The NATS URL(s) the Desktop dials")
    pairing_link: str = Field(
        description="The code and the hub as one link `cowork desktop pair` accepts; "
        "single use (it carries the one-time code) and expiring with it"
    )
    pairing_qr_svg: str = Field(description="A QR code of pairingLink: an SVG data URI")
    command: str = Field(description="The exact command to run on the Desktop")


class ChannelKindView(WireModel):
    kind: str
    inbound: str
    settings_schema: FreeObject = Field(description="A JSON Schema")
    secrets_schema: FreeObject = Field(description="A JSON Schema")


class ChannelKinds(WireModel):
    items: list[ChannelKindView]


class ErrorBody(WireModel):
    error: dict[str, str] = Field(description="{code, message}")


# --- views the admin API answers with (tests/hub/console/test_console_api.py checks
# each against real answers: a field the route adds or drops fails there) -------------
Stamp = str | None  # an ISO 8601 time, or null


class PairingView(WireModel):
    id: str
    label: str
    device_name: str | None
    status: str = Field(
        description="pending, paired_online, paired_offline, disabled, revoked, error"
    )
    enabled: bool
    online: bool
    allowed_workspace_ids: list[str]
    allowed_session_ids: list[str] | None
    policy: FreeObject
    revision: int
    redeemed: bool
    code_expires_at: Stamp
    heartbeat_interval_seconds: float | None
    last_connected_at: Stamp
    last_heartbeat_at: Stamp
    last_command_sequence: int | None
    trust: str | None = Field(
        default=None,
        description="hub or sealed, as the Desktop last reported it (docs/sealed.md); "
        "informational: the Desktop enforces it",
    )
    error: str | None
    created_at: Stamp
    updated_at: Stamp
    revoked_at: Stamp
    revoke_reason: str | None


class PairingPage(WireModel):
    items: list[PairingView]
    next_cursor: str | None


class GatewayRegistrationView(WireModel):
    registration_id: str
    display_name: str
    kind: str
    trust_model: str
    scopes: list[str]
    sync_scopes: list[str]
    approved_credentials: list[str]
    status: str
    status_reason: str | None
    online: bool = Field(
        description="Registered, not stopping, and heard from within three heartbeat intervals"
    )
    credential_expires_at: Stamp
    credential_version: int
    public_key: str | None
    versions: FreeObject | None = Field(description="What the Gateway runs, by component")
    capabilities: FreeObject | None
    work_kinds: list[str]
    max_concurrent_work: int
    health: str | None
    liveness: str | None
    mode: str | None
    current_load: int
    active_work_ids: list[str]
    heartbeat_sequence: int | None
    heartbeats_accepted: int
    heartbeat_interval_seconds: float | None
    last_heartbeat_at: Stamp
    last_error: str | None
    drain_deadline: Stamp
    registered_at: Stamp
    visible: bool
    sync: FreeObject
    created_by: str | None
    created_at: Stamp
    updated_at: Stamp
    revoked_at: Stamp
    revoke_reason: str | None


class GatewayRegistrationPage(WireModel):
    items: list[GatewayRegistrationView]
    next_cursor: str | None


class ChannelInstanceView(WireModel):
    instance_id: str
    tenant: str
    kind: str
    display_name: str
    workspace_id: str
    authority: str
    default_agent: str | None
    settings: FreeObject
    secret_names: list[str] = Field(description="Secrets are write-only: names, never values")
    enabled: bool
    revision: int
    webhook_path: str
    capabilities: FreeObject | None
    health: FreeObject
    created_by: str | None
    created_at: Stamp
    updated_at: Stamp


class ChannelInstanceList(WireModel):
    items: list[ChannelInstanceView]
    next_cursor: str | None


class AuditEntry(WireModel):
    id: int
    occurred_at: str
    tenant: str | None = None
    action: str
    actor_kind: str
    actor_id: str
    actor_label: str | None = None
    target_kind: str | None = None
    target_id: str | None = None
    workspace_id: str | None = None
    session_id: str | None = None
    command_id: str | None = None
    reason: str | None = None
    metadata: FreeObject


class AuditPage(WireModel):
    items: list[AuditEntry]


class WorkLease(WireModel):
    attempt: int
    registration_id: str
    claimed_at: Stamp
    ended_at: Stamp
    outcome: str | None


class WorkOutput(WireModel):
    sequence: int
    kind: str
    body: FreeValue
    attempt: int
    registration_id: str | None
    recorded_at: Stamp


class WorkView(WireModel):
    work_id: str
    kind: str
    state: str
    attempts: int
    max_attempts: int
    owner: str | None = Field(description="The Gateway holding its lease")
    lease_expires_at: Stamp
    session_ref: FreeValue
    requirements: FreeValue
    status: FreeValue = Field(description="The latest status the Gateway reported")
    result: FreeValue
    error: FreeValue
    last_sequence: int | None
    output_count: int
    created_by: str | None
    created_at: Stamp
    updated_at: Stamp
    completed_at: Stamp
    waiting: str | None = Field(default=None, description="Why nobody can take it, if so")
    leases: list[WorkLease] | None = Field(default=None, description="One work item's view only")
    events: list[WorkOutput] | None = Field(
        default=None, description="Its fenced outputs (one work item's view only)"
    )


class WorkPage(WireModel):
    items: list[WorkView]
    next_cursor: str | None
    waiting: str | None = None


class WorkEnqueued(WireModel):
    work_id: str
    state: str
    created: bool = Field(description="False: the idempotency key named work already enqueued")


# --- pairings' commands --------------------------------------------------------------
class CommandView(WireModel):
    command_id: str
    pairing_id: str
    sequence: int
    kind: str
    workspace_id: str
    session_id: str | None
    state: str
    status: str = Field(description="queued, delivered, or the Desktop's result status")
    result: FreeValue = Field(description="The Desktop's result, as it reported it")
    attempts: int
    created_at: Stamp
    completed_at: Stamp


class CommandQueued(WireModel):
    command_id: str
    sequence: int


class CommandSubmitted(RootModel[CommandView | CommandQueued]):
    """The command queued (its id and sequence), or with `?wait=`, its view once it
    is final or the wait is over."""


# --- Gateways ----------------------------------------------------------------------
class GatewayRegistered(WireModel):
    registration_id: str
    credential: str = Field(description="The Gateway's bootstrap credential; shown once")
    credential_expires_at: str
    kind: str
    trust_model: str
    scopes: list[str]
    sync_scopes: list[str]
    status: str


class GatewayCredentialRotated(WireModel):
    registration_id: str
    credential: str = Field(description="The new credential; shown once")
    credential_expires_at: str
    credential_version: int


class GatewaySyncView(WireModel):
    registration_id: str
    scope: str
    items: FreeValue = Field(description="The items as the Gateway last reported them")
    item_count: int
    cursor: str | None
    updated_at: Stamp


# --- chat channels -------------------------------------------------------------------
class ChannelClaimCode(WireModel):
    code: str = Field(description="The code a chat user sends to claim the role; shown once")
    expires_at: Stamp
    role: str
    instance_id: str | None


class DeliveryView(WireModel):
    delivery_id: str
    instance_id: str
    chat_id: str
    status: str = Field(description="queued, sent, retrying, dead_lettered, duplicate")
    attempts: int
    provider_message_id: str | None = None
    error: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


class TestMessageQueued(WireModel):
    delivery_id: str


class ChannelUserView(WireModel):
    instance_id: str
    provider_user_id: str
    username: str | None
    display_name: str | None
    role: str
    promoted_by: str | None
    first_seen_at: Stamp
    updated_at: Stamp


class ChannelUserList(WireModel):
    users: list[ChannelUserView]
    next_cursor: str | None


class ChannelCredentialIssued(WireModel):
    user_jwt: str
    expires_at: Stamp
    inbox_prefix: str
    consumer: str
    workspace_id: str | None
    nats_url: str = Field(description="The NATS URL as this hub dials it")


# --- bus credentials -----------------------------------------------------------------
class CredentialIssued(WireModel):
    user_jwt: str
    expires_at: Stamp


class PrincipalView(WireModel):
    kind: str
    principal_id: str
    status: str
    workspaces: list[str]
    scopes: list[str]
    keys: int = Field(description="How many public keys it holds credentials for")
    created_at: str
    revoked_at: Stamp
    expires_at: Stamp


class PrincipalList(WireModel):
    items: list[PrincipalView]
    next_cursor: str | None


class PrincipalRevoked(WireModel):
    revoked_keys: int
    status: Literal["revoked"]


# --- workspace events ----------------------------------------------------------------
class WorkspaceEventView(WireModel):
    sequence: int = Field(description="Its place in the workspace's log (the SSE event id)")
    id: str
    type: str
    session_id: str | None
    command_id: str | None
    occurred_at: str
    payload: FreeValue = Field(
        description="The event as the Desktop relayed it (redacted; opaque to the hub)"
    )


class WorkspaceEventPage(WireModel):
    items: list[WorkspaceEventView]
    last_sequence: int = Field(description="Pass as `after` for the next page")


class ChannelControllerView(WireModel):
    """A channel instance's controller: public facts only, never its keys."""

    instance_id: str
    pairing_id: str
    controller_id: str
    fingerprint: str = Field(description="As `cowork desktop controllers list` shows it")
