"""The bus contract: the envelope, the subject taxonomy and every message model.

This package does no I/O and imports nothing else of this project. Subjects are
in `schemas.subjects`; the JSON Schema / AsyncAPI generators in `schemas.docs`.
"""

from . import subjects
from ._base import Message, WireModel
from ._catalog import MESSAGES, message_model
from ._envelope import ContractError, Envelope, Source, decode, new_id, utc_now
from ._messages import *  # noqa: F401,F403  (the message models are the public face)
from ._tokens import InvalidTokenError, TenantId, TokenId, check_tenant, check_token
from ._vocabulary import *  # noqa: F401,F403

__all__ = [
    "subjects", "Message", "WireModel", "MESSAGES", "message_model",
    "ContractError", "Envelope", "Source", "decode", "new_id", "utc_now",
    "InvalidTokenError", "TenantId", "TokenId", "check_tenant", "check_token",
]
from ._secrets import SECRET_REDACTED, is_secret_key, scrub_secrets, scrub_text

__all__ += ["SECRET_REDACTED", "is_secret_key", "scrub_secrets", "scrub_text"]
from ._creds import parse_creds, render_creds
from ._messages import NkeyPublic

__all__ += ["parse_creds", "render_creds", "NkeyPublic"]
from . import _versions as versions

__all__ += ["versions"]
from ._envelope import EnvelopeTemplate

__all__ += ["EnvelopeTemplate"]
