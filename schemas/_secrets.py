"""Recognising secrets: secret-looking keys and token-shaped values (pure functions).

Shared by everything that writes outside its process (audit rows, logs, and the
Desktop's redaction before events leave the machine), so there is one list of
token shapes to keep current.

`scrub_text` makes two passes over a string, both skipped by a cheap pre-check
when the string cannot hold a secret:

1. token shapes (`TOKEN_SHAPE`): each anchored on a distinctive prefix or
   structure so ordinary prose and ids (`ses_…`, `msg_…`, UUIDs, git SHAs) are
   left alone; the whole match becomes `[secret-redacted]`;
2. secret-named assignments in free text (`ASSIGNMENT`): `OPENAI_API_KEY=…`,
   `password: hunter2`, `"client_secret": "…"`, `--token abc`, `?access_token=…`;
   the key stays, the value becomes `[secret-redacted]`.

Scrubbing is idempotent: scrubbing scrubbed text changes nothing.
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

_L = r"(?<![A-Za-z0-9])"  # a token starts at a word edge ("disk-…" is not "sk-…")
_R = r"(?![A-Za-z0-9_-])"  # and ends at one

# The shapes with no literal that every match of theirs holds (see _HINTS).
_NATS_SEED = r"(?<![A-Z0-9])S[OAUNCX][A-Z2-7]{56}(?![A-Z2-7])"  # NATS nkey seeds
_TWILIO_KEY = _L + r"SK[0-9a-fA-F]{32}(?![0-9A-Za-z])"  # Twilio API key
# Discord bot token: base64 user id . timestamp . hmac
_DISCORD_BOT_TOKEN = (
    r"(?<![A-Za-z0-9_-])[MNO][A-Za-z0-9_-]{23,27}\.[A-Za-z0-9_-]{6,7}\.[A-Za-z0-9_-]{27,45}" + _R
)
# Shapes of real credentials. Each is anchored on a distinctive prefix or
# structure so ordinary prose and ids are left alone.
_TOKEN_SHAPES = [
    # OpenAI (sk-proj-, sk-svcacct-, sk-admin-), Anthropic (sk-ant-api03-…), OpenRouter (sk-or-v1-…)
    _L + r"sk-(?:proj|ant|or|svcacct|admin|None)-[A-Za-z0-9_-]{16,}",
    _L + r"sk-[A-Za-z0-9]{20,}",  # legacy OpenAI and compatible providers (DeepSeek, …)
    _L + r"sk-(?=[A-Za-z_-]*[0-9])[A-Za-z0-9_-]{16,}",  # other sk- keys (a digit: not "sk-learn-…")
    r"AIza[0-9A-Za-z_-]{35}",  # Google API key
    r"ya29\.[0-9A-Za-z._-]{20,}",  # Google OAuth access token
    r"GOCSPX-[0-9A-Za-z_-]{20,}",  # Google OAuth client secret
    r"1//0[0-9A-Za-z_-]{30,}",  # Google refresh token
    _L + r"xox[abposre]-[0-9A-Za-z-]{10,}",  # Slack bot/user/config tokens
    _L + r"xapp-\d-[0-9A-Za-z-]{10,}",  # Slack app-level token
    r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[0-9A-Za-z/_-]{10,}",  # Slack webhook
    r"https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d+/[0-9A-Za-z_-]{20,}",
    r"(?<![0-9])\d{6,12}:AA[0-9A-Za-z_-]{30,}" + _R,  # Telegram bot token
    _L + r"gh[pousr]_[0-9A-Za-z]{30,}",  # GitHub tokens
    _L + r"github_pat_[0-9A-Za-z_]{22,}",  # GitHub fine-grained PAT
    _L + r"gl(?:pat|dt|rt|ptt|ft|soat|cbt)-[0-9A-Za-z_-]{20,}",  # GitLab tokens
    _L + r"(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}(?![0-9A-Za-z])",  # AWS access key id
    r"(?<![A-Za-z0-9_-])eyJ[0-9A-Za-z_-]{8,}\.[0-9A-Za-z_-]{8,}\.[0-9A-Za-z_-]*",  # JWT / JWS
    _NATS_SEED,
    _L + r"whsec_[0-9A-Za-z+/=]{20,}",  # webhook signing secrets (Stripe, Svix, …)
    _L + r"(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}",  # Stripe
    _L + r"hf_[0-9A-Za-z]{30,}",  # Hugging Face
    _L + r"npm_[0-9A-Za-z]{36}",  # npm
    _L + r"pypi-AgE[0-9A-Za-z_-]{50,}",  # PyPI
    _TWILIO_KEY,
    _DISCORD_BOT_TOKEN,
    # PEM private keys; a block cut before its END line is scrubbed to the end of the text
    r"-----BEGIN[A-Z ]*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[\s\S]*?-----END[A-Z ]*PRIVATE KEY(?: BLOCK)?-----|[\s\S]*)",
    r"(?i:\bbearer)\s+[0-9A-Za-z._~+/-]{16,}=*",  # Authorization: Bearer
    # Authorization: Basic <base64>: digits, +, / or a lower-to-upper turn, so not prose
    r"(?i:\bbasic)\s+(?=[A-Za-z]*?(?:[0-9+/=]|[a-z][A-Z]))[A-Za-z0-9+/]{12,}={0,2}",
    r"(?<=://)[^\s:/@?#\[\]]*:[^\s@/?#\[\]]+(?=@)",  # URL credentials scheme://user:pass@host
]
TOKEN_SHAPE = re.compile("|".join(f"(?:{p})" for p in _TOKEN_SHAPES))
# The shapes none of whose matches holds one of the literal hints below (NATS seeds,
# Twilio keys, Discord bot tokens): the only ones that can match a text without a
# hint, e.g. every streamed part's id (`prt_…`, a long run and no hint). Scanning
# for these three instead of all of TOKEN_SHAPE there is the same scrub for less:
# about a fifth of a Desktop's relay time went to that scan (docs/performance.md,
# relay round 9). In TOKEN_SHAPE's order, so that leftmost matches are the same.
_UNHINTED_SHAPES = [p for p in _TOKEN_SHAPES if p in (_NATS_SEED, _TWILIO_KEY, _DISCORD_BOT_TOKEN)]
UNHINTED_SHAPE = re.compile("|".join(f"(?:{p})" for p in _UNHINTED_SHAPES))

# `KEY=value`, `KEY: value`, `"key": "value"`, `--key value`, `-u user:pass` in free text,
# where KEY names a secret as a whole segment (`GITHUB_TOKEN`, `accessToken`,
# `AWS_SECRET_ACCESS_KEY`) but not a count or a word (`max_tokens`, `tokenizer`, `author`).
_SECRET_WORD = (
    r"(?:secret|passwo?r?d|passphrase|pwd|token|credentials?|api[_-]?key|apikey|"
    r"access[_-]?key|account[_-]?key|private[_-]?key|signing[_-]?key|session[_-]?key|"
    r"auth|authorization|dsn)"
)
_ASSIGN_KEY = r"[A-Za-z0-9_.-]{0,40}?" + _SECRET_WORD + r"(?:[_.-][A-Za-z0-9]+){0,4}"
_SCHEMES = r"(?:Bearer|Basic|Token|Digest)"
ASSIGNMENT = re.compile(
    r"(?P<pre>"
    r"(?<![A-Za-z0-9_.-])" + _ASSIGN_KEY + r"[\"']?[ \t]*[:=][ \t]*"
    r"|(?<![\w-])--?" + _ASSIGN_KEY + r"[ \t]+"
    r"|(?<![\w-])(?:-u|--user)[ \t]+[\"']?[^\s:\"']+:"
    r")"
    r"(?P<scheme>" + _SCHEMES + r"[ \t]+)?"
    r"(?!" + _SCHEMES + r"\s|\[|(?:null|none|true|false|undefined)(?![A-Za-z0-9]))"
    r"(?:\"[^\"\r\n]{1,1024}\"|'[^'\r\n]{1,1024}'|[^\s\"'&,;<>(){}\[\]]+)",
    re.IGNORECASE,
)
# Cookie headers: the whole value (every `name=value; …` pair) to the end of the line.
_COOKIE = re.compile(
    r"(?P<pre>(?<![\w-])(?:set-)?cookie[\"']?[ \t]*[:=][ \t]*)"
    r"(?![\s\[])(?:\"[^\"\r\n]+\"|'[^'\r\n]+'|[^\r\n\"']+)",
    re.IGNORECASE,
)
_REPLACE_VALUE = r"\g<pre>\g<scheme>" + SECRET_REDACTED
_REPLACE_COOKIE = r"\g<pre>" + SECRET_REDACTED

# A cheap pre-check: every pattern above needs one of these literals (in the
# lower-cased text) or a long run of token characters.
_HINTS = (
    "sk-",
    "aiza",
    "ya29.",
    "gocspx-",
    "1//0",
    "xox",
    "xapp-",
    "hooks.slack",
    "discord",
    ":aa",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "gldt-",
    "glrt-",
    "glptt-",
    "glft-",
    "glsoat-",
    "glcbt-",
    "akia",
    "asia",
    "abia",
    "acca",
    "eyj",
    "whsec_",
    "_live_",
    "_test_",
    "hf_",
    "npm_",
    "pypi-",
    "-----begin",
    "bearer",
    "basic",
    "://",
    "secret",
    "passw",
    "passp",
    "pwd",
    "token",
    "credential",
    "apikey",
    "api_key",
    "api-key",
    "auth",
    "dsn",
    "cookie",
    "-u ",
    "-u\t",
    "--user",
) + tuple(
    f"{w}{sep}key"
    for w in ("access", "account", "private", "signing", "session")
    for sep in ("", "_", "-")
)


def _trie_pattern(words: tuple[str, ...]) -> str:
    """One regex alternation for many literals, factored by prefix (about 3x faster)."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        if "" in node:  # a shorter hint is enough: longer ones after it are redundant
            return ""
        alts = [re.escape(char) + build(child) for char, child in sorted(node.items())]
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return build(trie)


_HINT = re.compile(_trie_pattern(_HINTS))
_LONG_RUN = re.compile(r"[A-Za-z0-9_-]{24}")


# Keys that match SECRET_KEY but name no secret: OpenCode's usage counts
# (`tokens: {input, output, reasoning, cache}`) and their relatives. Their values
# are still scrubbed like any other value.
NOT_SECRET_KEY = re.compile(
    r"(?:(?:max|input|output|reasoning|total|cache[ds]?|prompt|completion)[_-]?)?tokens",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key)) and not NOT_SECRET_KEY.fullmatch(key)


def scrub_text(text: str) -> str:
    """Replace every token-shaped substring and secret assignment value in `text`."""
    lowered = text.lower()
    hint = _HINT.search(lowered)
    if hint:
        text = TOKEN_SHAPE.sub(SECRET_REDACTED, text)
    elif _LONG_RUN.search(text):
        text = UNHINTED_SHAPE.sub(SECRET_REDACTED, text)
    else:
        return text
    # Every ASSIGNMENT match holds a secret word, and each is a hint: without one (an
    # id-like run of characters alone, as in every streamed part's id) it cannot match.
    if hint or _HINT.search(text.lower()):
        text = ASSIGNMENT.sub(_REPLACE_VALUE, text)
    if "cookie" in lowered:
        text = _COOKIE.sub(_REPLACE_COOKIE, text)
    return text


def scrub_secrets(value: Any, _depth: int = 0) -> Any:
    """A copy of a JSON-like value with secret keys' values and token shapes replaced."""
    if _depth > 32:
        return "[depth-limit]"
    if isinstance(value, dict):
        return {
            k: SECRET_REDACTED
            if isinstance(k, str) and is_secret_key(k) and v not in (None, "")
            else scrub_secrets(v, _depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v, _depth + 1) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value
