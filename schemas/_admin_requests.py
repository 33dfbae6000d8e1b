"""Request bodies of the admin HTTP API (docs/openapi.json names each): pairings
and their commands, Gateways, channels, bus credentials, edge work. The answers
are in `_admin_api`. A value the hub does not shape is `FreeObject` on purpose."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ._admin_api import FreeObject
from ._base import WireModel
from ._messages import AllowList, Label, NkeyPublic, PairingPolicy, SessionRef, WorkRequirements
from ._sealed import SignedCommand
from ._tokens import TokenId
from ._vocabulary import ChannelRole, CommandKind, GatewayKind, PrincipalKind, TrustModel

# A channel instance's id: also its webhook path and part of its subjects.
CHANNEL_INSTANCE_ID = r"^[a-z][a-z0-9_-]{0,63}$"
Name = Annotated[Label, Field(min_length=1)]
Reason = Annotated[str, Field(min_length=1, max_length=512)]
ScopeName = Annotated[str, Field(min_length=1, max_length=128)]
# An OpenCode agent name (`build`, `plan`, a custom agent's file name). Whether the
# workspace's OpenCode has it is known only there: an unknown one fails the first
# prompt with OpenCode's own words ("Agent not found ... Available agents: ...").
Agent = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
CredentialTtl = Annotated[int, Field(ge=60, le=30 * 24 * 3600)]


class Empty(WireModel):
    pass


# --- pairings ------------------------------------------------------------------------
class CreatePairing(WireModel):
    label: Name
    allowed_workspace_ids: list[TokenId] = Field(default_factory=list, max_length=127)
    allowed_session_ids: AllowList | None = None
    policy: PairingPolicy = Field(default_factory=PairingPolicy)
    code_ttl_seconds: int = Field(default=600, ge=60, le=3600)


class PolicyPatch(WireModel):
    allow_remote_prompts: bool | None = None
    allow_remote_abort: bool | None = None
    remote_approvals: str | None = None
    remote_questions: str | None = None
    expose_artifact_bodies: bool | None = None
    expose_local_paths: bool | None = None
    expose_local_mcp_details: bool | None = None
    allow_remote_attachments: bool | None = None


class UpdatePairing(WireModel):
    label: Name | None = None
    enabled: bool | None = None
    allowed_workspace_ids: list[TokenId] | None = Field(default=None, max_length=127)
    allowed_session_ids: AllowList | None = None
    policy: PolicyPatch | None = None


class RevokePairing(WireModel):
    reason: Reason = "revoked by an administrator"


class SubmitCommand(WireModel):
    id: TokenId | None = Field(default=None, description="Idempotency: resubmitting is a no-op")
    kind: CommandKind
    workspace_id: TokenId = "local"
    session_id: TokenId | None = None
    payload: FreeObject | None = Field(
        default=None, description="As the command kind needs (schemas: the command payloads)"
    )
    actor_id: Annotated[str, Field(max_length=512)] | None = None
    actor_label: Label | None = None
    signed: SignedCommand | None = Field(
        default=None,
        description="A controller's signed command (sealed pairings): its payload is "
        "inside, sealed to the Desktop; the hub stores and pushes it, the Desktop checks it",
    )


# --- Gateways ------------------------------------------------------------------------
class CreateRegistration(WireModel):
    display_name: Name
    kind: GatewayKind
    trust_model: TrustModel
    scopes: list[ScopeName] | None = Field(default=None, max_length=16)
    sync_scopes: list[ScopeName] | None = Field(default=None, max_length=32)
    approved_credentials: list[TokenId] = Field(default_factory=list, max_length=64)
    credential_ttl_days: float | None = Field(default=None, gt=0, le=365)


class RotateRegistration(WireModel):
    credential_ttl_days: float | None = Field(default=None, gt=0, le=365)


class RevokeRegistration(WireModel):
    reason: Reason = "revoked by an administrator"


class DrainRegistration(WireModel):
    deadline_seconds: int = Field(ge=1, le=86_400)


# --- chat channels -------------------------------------------------------------------
class CreateInstance(WireModel):
    instance_id: str = Field(pattern=CHANNEL_INSTANCE_ID)
    kind: str = Field(min_length=1, max_length=64)
    workspace_id: TokenId
    authority: Literal["desktop_paired", "cloud_worker"] = "desktop_paired"
    display_name: Label = ""
    default_agent: Agent | None = None
    settings: FreeObject = Field(
        default_factory=dict, description="As the kind's settingsSchema says (GET …/channel-kinds)"
    )
    secrets: FreeObject = Field(
        default_factory=dict, description="As the kind's secretsSchema says; write-only"
    )
    enabled: bool = True


class UpdateInstance(WireModel):
    """Only the fields sent change; `settings` is replaced whole, `secrets` key by key
    (a null value removes an optional secret)."""

    display_name: Label | None = None
    workspace_id: TokenId | None = None
    authority: Literal["desktop_paired", "cloud_worker"] | None = None
    default_agent: Agent | None = None
    settings: FreeObject | None = Field(default=None, description="Replaces the settings whole")
    secrets: FreeObject | None = Field(
        default=None, description="Changed key by key; a null value removes an optional secret"
    )
    enabled: bool | None = None


class IssueCredential(WireModel):
    public_key: NkeyPublic
    ttl_seconds: CredentialTtl | None = None


class CreateClaimCode(WireModel):
    role: ChannelRole
    instance_id: TokenId | None = None


class SetRole(WireModel):
    role: ChannelRole


class TestMessage(WireModel):
    chat_id: str = Field(min_length=1, max_length=256, description="The platform's chat id")
    thread_id: str | None = Field(default=None, max_length=256)
    text: str = Field(
        default="A test message from the cowork console.", min_length=1, max_length=4000
    )


# --- bus credentials -----------------------------------------------------------------
class IssueRequest(WireModel):
    kind: PrincipalKind
    principal_id: TokenId
    public_key: NkeyPublic
    workspaces: list[TokenId] = Field(default_factory=list, max_length=128)
    ttl_seconds: CredentialTtl | None = None


class RevokeRequest(WireModel):
    reason: Reason


# --- edge work -----------------------------------------------------------------------
class EnqueueWork(WireModel):
    kind: TokenId
    session_ref: SessionRef
    payload: FreeObject = Field(description="The work's input, as its kind needs")
    requirements: WorkRequirements = Field(default_factory=WorkRequirements)
    idempotency_key: TokenId | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=100)


class CancelWork(WireModel):
    reason: str = Field(default="cancelled by an administrator", min_length=1, max_length=500)


# --- a channel instance enrolled as a controller of its sealed Desktop ---------------
Seed = Annotated[str, Field(min_length=43, max_length=43, pattern=r"^[A-Za-z0-9_-]+$")]


class ChannelControllerKeys(WireModel):
    """A controller's private keys (`ControllerKeys.to_json`): 32-byte seeds, base64url."""

    label: Name
    signing_seed: Seed = Field(description="Ed25519 private seed, base64url")
    encryption_seed: Seed = Field(description="X25519 private key, base64url")


class SetChannelController(WireModel):
    """Keys a chat channel instance signs and opens with, as a controller enrolled on
    its sealed Desktop (`cowork channel enrol INSTANCE LINK` enrols them first). The hub
    keeps them encrypted and never returns them: it holds them, so it can act as this
    controller (docs/sealed.md, "Channels")."""

    pairing_id: TokenId = Field(description="The instance's workspace: the pairing it drives")
    keys: ChannelControllerKeys
    desktop_key: Seed = Field(
        description="The Desktop's X25519 public key, from the invite link (not the hub)"
    )
    next_sequence: int = Field(default=1, ge=1, description="The next controller sequence")
