"""Recognising secrets: secret-looking keys and token-shaped values (pure functions).

Shared by everything that writes outside its process (audit rows, logs, and the
Desktop's redaction before events leave the machine), so there is one list of
token shapes to keep current.
"""

from __future__ import annotations

import re
from typing import Any

SECRET_REDACTED = "[secret-redacted]"

SECRET_KEY = re.compile(
    r"token|secret|password|passwd|credential|api[_-]?key|authorization|cookie|refresh|"
    r"private[_-]?key|seed|jwt",
    re.IGNORECASE,
)

# Shapes of real credentials. Each is anchored on a distinctive prefix or
# structure so ordinary prose and ids are left alone.
_TOKEN_SHAPES = [
    r"sk-(?:proj-|ant-(?:api|admin)\d{2}-|or-v1-|svcacct-)?[A-Za-z0-9_-]{16,}",  # OpenAI, Anthropic, OpenRouter
    r"AIza[0-9A-Za-z_-]{35}",  # Google API key
    r"ya29\.[0-9A-Za-z_-]{20,}",  # Google OAuth access token
    r"GOCSPX-[0-9A-Za-z_-]{20,}",  # Google OAuth client secret
    r"1//0[0-9A-Za-z_-]{30,}",  # Google refresh token
    r"xox[abposr]-[0-9A-Za-z-]{10,}",  # Slack bot/user/app tokens
    r"xapp-\d-[0-9A-Za-z-]{10,}",  # Slack app-level token
    r"\b\d{8,10}:AA[0-9A-Za-z_-]{33}\b",  # Telegram bot token
    r"gh[pousr]_[0-9A-Za-z]{36,}",  # GitHub tokens
    r"github_pat_[0-9A-Za-z_]{22,}",  # GitHub fine-grained PAT
    r"glpat-[0-9A-Za-z_-]{20,}",  # GitLab PAT
    r"\bA(?:KIA|SIA)[0-9A-Z]{16}\b",  # AWS access key id
    r"\beyJ[0-9A-Za-z_-]{8,}\.eyJ[0-9A-Za-z_-]{8,}\.[0-9A-Za-z_-]{8,}",  # JWT
    r"\bS[OAU][A-Z2-7]{56}\b",  # NATS nkey seeds (operator, account, user)
    r"whsec_[0-9A-Za-z+/=]{20,}",  # webhook signing secrets
    r"\b(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}",  # Stripe
    r"\bhf_[0-9A-Za-z]{30,}",  # Hugging Face
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    r"(?i:bearer|basic)\s+[0-9A-Za-z._~+/-]{16,}=*",  # Authorization header values
    r"(?i:postgres(?:ql)?|mysql|redis|amqp|nats|mongodb(?:\+srv)?)://[^\s:/@]+:[^\s@/]+@",  # URL credentials
]
TOKEN_SHAPE = re.compile("|".join(f"(?:{p})" for p in _TOKEN_SHAPES))


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def scrub_text(text: str) -> str:
    """Replace every token-shaped substring of `text`."""
    return TOKEN_SHAPE.sub(SECRET_REDACTED, text)


def scrub_secrets(value: Any, _depth: int = 0) -> Any:
    """A copy of a JSON-like value with secret keys' values and token shapes replaced."""
    if _depth > 32:
        return "[depth-limit]"
    if isinstance(value, dict):
        return {
            k: SECRET_REDACTED if isinstance(k, str) and is_secret_key(k) and v not in (None, "")
            else scrub_secrets(v, _depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v, _depth + 1) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value
