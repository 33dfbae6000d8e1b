"""What both edge agents share: the OpenCode client, redaction, edge credentials
and their refresh, the bootstrap exchange, state directories and CLI helpers,
and the cryptography of sealed pairings (the Desktop's and its controllers').
"""

from __future__ import annotations

from schemas import ControllerKeys, ControllerPublic, controller_id_of

from ._bootstrap import BootstrapFailed, bootstrap_exchange, bootstrap_options, dial_once
from ._cancel import honour_dropped_cancel
from ._cli import (
    DEFAULT_OPENCODE_URL,
    add_opencode_server,
    add_state_dir,
    add_status_command,
    documented_command,
    fail,
    http_url,
    hub_urls,
    interval_seconds,
    number_between,
    port_number,
    run_subcommand,
    serve,
)
from ._credentials import (
    CredentialRefreshError,
    EdgeCredentials,
    new_user_seed,
    refresh_forever,
    refresh_once,
)
from ._log_once import Repeats
from ._opencode import (
    RESYNC,
    STREAM_OPEN_WAIT,
    OpenCodeClient,
    OpenCodeError,
    OpenCodeEvents,
    session_of,
)
from ._reconnect import ReconnectPolicy, dial
from ._redaction import RedactionPolicy, redact, redact_event, redact_text, redaction_policy
from ._retry import (
    AnswerTimes,
    ReplyInbox,
    ask,
    attempt_timeouts,
    jittered_backoff,
    not_refused_as,
    reply_inbox,
)
from ._sealed import ContentKey, DesktopSealingKey, InviteLink, normalise_fingerprint
from ._state_dir import StateDirectory, now_iso, state_dir_from_env, write_private

__all__ = [
    "honour_dropped_cancel",
    "ReplyInbox",
    "reply_inbox",
    "ContentKey",
    "ControllerKeys",
    "ControllerPublic",
    "DesktopSealingKey",
    "InviteLink",
    "controller_id_of",
    "normalise_fingerprint",
    "BootstrapFailed",
    "CredentialRefreshError",
    "DEFAULT_OPENCODE_URL",
    "EdgeCredentials",
    "OpenCodeClient",
    "OpenCodeError",
    "OpenCodeEvents",
    "STREAM_OPEN_WAIT",
    "RESYNC",
    "ReconnectPolicy",
    "RedactionPolicy",
    "Repeats",
    "StateDirectory",
    "add_opencode_server",
    "add_state_dir",
    "add_status_command",
    "AnswerTimes",
    "ask",
    "not_refused_as",
    "attempt_timeouts",
    "bootstrap_exchange",
    "bootstrap_options",
    "dial",
    "dial_once",
    "documented_command",
    "fail",
    "http_url",
    "hub_urls",
    "interval_seconds",
    "jittered_backoff",
    "new_user_seed",
    "now_iso",
    "number_between",
    "port_number",
    "redact",
    "redact_event",
    "redact_text",
    "redaction_policy",
    "refresh_forever",
    "refresh_once",
    "run_subcommand",
    "serve",
    "session_of",
    "state_dir_from_env",
    "write_private",
]
