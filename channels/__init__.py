"""Channel provider platform: chat platforms as workspace surfaces.

Channel code never imports the database, `hub` internals or the OpenCode client:
it talks to the hub over the bus with each instance's own credentials. The hub
hosts the runtime (it owns instance configuration and secrets) through the names
exported here, and nothing else.
"""

from ._kv_lease import KvLease, LeaseLost, direct_kv
from ._provider import (
    BadRequest,
    ButtonLimits,
    Capabilities,
    ChannelError,
    DeliveryFailed,
    InstanceConfig,
    Provider,
    ProviderSettings,
    SendResult,
    VerificationFailed,
    WebhookRequest,
    WebhookResult,
    destination_changed,
    message_id,
)
from ._registry import (
    PROVIDERS,
    TRANSPORTS,
    UnknownProvider,
    capability_matrix,
    capability_rows,
    capability_table_markdown,
    provider_class,
)
from ._transport import (
    InboundTransport,
    TransportSettings,
    TransportSink,
    webhook_secrets_missing,
)
from .cli import add_channel_commands
from .runtime import ChannelRuntime, RuntimeOptions

__all__ = [
    "KvLease",
    "LeaseLost",
    "direct_kv",
    "BadRequest",
    "ButtonLimits",
    "Capabilities",
    "ChannelError",
    "DeliveryFailed",
    "InstanceConfig",
    "Provider",
    "ProviderSettings",
    "SendResult",
    "VerificationFailed",
    "WebhookRequest",
    "WebhookResult",
    "destination_changed",
    "message_id",
    "PROVIDERS",
    "TRANSPORTS",
    "InboundTransport",
    "TransportSettings",
    "TransportSink",
    "webhook_secrets_missing",
    "UnknownProvider",
    "capability_matrix",
    "capability_rows",
    "capability_table_markdown",
    "provider_class",
    "ChannelRuntime",
    "RuntimeOptions",
    "add_channel_commands",
]
