"""Redaction of everything a Desktop sends off the machine (pure functions).

Implements the product contract's rules ("Redaction before anything leaves the
Desktop"), recursively, on a copy:

- keys naming a secret (`token|secret|password|credential|api[_-]?key|
  authorization|cookie|refresh`, case-insensitive, anywhere in the key, plus
  the shared scrubber's `passwd|private_key|seed|jwt`) -> `[secret-redacted]`,
  whatever the policy;
- keys `command, args, env, cwd, stdio, process, pid, serverPath` ->
  `[local-mcp-detail-redacted]` unless `expose_local_mcp_details`;
- keys `body, contentBase64, dataBase64` -> `[artifact-body-redacted]` unless
  `expose_artifact_bodies`;
- a key named `directory` -> None; OpenCode's other path-bearing keys (`path`,
  `worktree`, `root`, `cwd`, and a file part's `filename`) -> `[local-path]`
  when a non-empty string (OpenCode's session `path` is relative to the
  worktree, which is `/` outside git: `home/alice/...` has no leading slash),
  walked when an object; and in every string absolute paths under
  /Users, /home, /private, /var, /tmp, /Volumes (and /root, /mnt, /media),
  Windows drive and UNC paths -> `[local-path]`, `file://` URLs ->
  `[local-file-url]`, unless `expose_local_paths`;
- limits: strings cut at 16384 characters (`...[truncated]` appended), at most
  50 list items and 100 object keys (the last slot holds a "more" marker), and
  containers nested deeper than 6 below the root -> `[redacted-depth]`.

Usage counts (`tokens`, `maxTokens`, ...) are not secrets by their key name
(`schemas._secrets.is_secret_key`); their values are scrubbed like any other.
Every string and key also loses what PostgreSQL cannot store (NUL, lone
surrogates -> U+FFFD), so an honest Desktop never sends a poison event.

Beyond the reference: token-shaped values are scrubbed wherever they sit (under
harmless keys, inside prose, URLs and dict keys) by `schemas._secrets.scrub_text`,
which also replaces values of secret-named assignments in free text
(`OPENAI_API_KEY=…`, `password: hunter2`). Redaction is idempotent.

It runs on every streamed delta, so short strings are memoised and strings
that cannot hold a secret or a path skip the regular expressions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from typing import Any

from schemas import SECRET_REDACTED, is_secret_key, scrub_text, storable_text

MAX_STRING_CHARS = 16 * 1024
MAX_ARRAY_ITEMS = 50
MAX_OBJECT_KEYS = 100
MAX_DEPTH = 6

TRUNCATED = "...[truncated]"
DEPTH_REDACTED = "[redacted-depth]"
MCP_REDACTED = "[local-mcp-detail-redacted]"
ARTIFACT_REDACTED = "[artifact-body-redacted]"
LOCAL_PATH = "[local-path]"
LOCAL_FILE_URL = "[local-file-url]"
UNSUPPORTED = "[unsupported]"
MORE_KEYS = "__redacted"

MCP_DETAIL_KEYS = frozenset(
    {"command", "args", "env", "cwd", "stdio", "process", "pid", "serverPath"}
)
ARTIFACT_BODY_KEYS = frozenset({"body", "contentBase64", "dataBase64"})
PATH_KEYS = frozenset({"path", "worktree", "root", "cwd"})
_POLICY_KEYS = {
    "exposeArtifactBodies": "expose_artifact_bodies",
    "exposeLocalPaths": "expose_local_paths",
    "exposeLocalMcpDetails": "expose_local_mcp_details",
}

_ROOTS = r"(?:Users|home|private|var|tmp|Volumes|root|mnt|media)"
_PATH_END = r"(?:\\ |[^\s\"'`()\[\]{}<>,;|])"  # a path runs to whitespace or punctuation
_LOCAL = re.compile(
    # file:// URLs (any host, any path)
    r"(?P<url>(?i:\bfile:)//" + _PATH_END + r"*)"
    # Windows drive paths C:\… or C:/… and UNC paths \\server\share
    r"|(?<![A-Za-z0-9])[A-Za-z]:(?:\\|/(?!/))" + _PATH_END + r"*"
    r"|(?<![\\\w])\\\\[A-Za-z0-9._$-]+\\" + _PATH_END + r"*"
    # POSIX absolute paths, also JSON-escaped (\/home\/…) and URL-encoded (%2Fhome%2F…);
    # not the path part of a URL or a relative path (a word character before the slash)
    r"|(?<![A-Za-z0-9_.~\]/-])(?:/|\\/)" + _ROOTS + r"(?:/|\\/)" + _PATH_END + r"+"
    r"|(?i:%2F)" + _ROOTS + r"(?i:%2F)[^\s\"'`()\[\]{}<>,;|&]+"
)

# keys: how their values are treated
_PLAIN, _SECRET, _MCP, _ARTIFACT, _DIRECTORY, _PATH = range(6)


@dataclass(frozen=True)
class RedactionPolicy:
    """What a pairing lets leave the machine beyond the redacted minimum."""

    expose_artifact_bodies: bool = False
    expose_local_paths: bool = False
    expose_local_mcp_details: bool = False

    @classmethod
    def from_policy(cls, mapping: Mapping[str, Any] | None) -> RedactionPolicy:
        """From a pairing policy (camelCase keys); only a literal `True` exposes anything."""
        if not mapping:
            return cls()
        return cls(**{field: mapping.get(key) is True for key, field in _POLICY_KEYS.items()})


DEFAULT_POLICY = RedactionPolicy()


def redaction_policy(policy: Any) -> RedactionPolicy:
    """From a `schemas.PairingPolicy` (or anything with its three expose_* fields)."""
    return RedactionPolicy(
        expose_artifact_bodies=policy.expose_artifact_bodies is True,
        expose_local_paths=policy.expose_local_paths is True,
        expose_local_mcp_details=policy.expose_local_mcp_details is True,
    )


def redact(value: Any, policy: RedactionPolicy = DEFAULT_POLICY) -> Any:
    """A redacted copy of a JSON-like value (the input is never modified)."""
    return _walk(
        value,
        0,
        policy.expose_local_paths,
        policy.expose_local_mcp_details,
        policy.expose_artifact_bodies,
    )


def redact_event(event: dict[str, Any], policy: RedactionPolicy = DEFAULT_POLICY) -> dict[str, Any]:
    """A redacted copy of one OpenCode event (`{id, type, properties}` or the
    `/global/event` wrapper `{directory, project, payload}`).

    Event types and ids (`evt_…`, `ses_…`, `msg_…`, `prt_…`, `per_…`, `que_…`) are never
    token-shaped, so they come through unchanged.
    """
    out = redact(event, policy)
    if not isinstance(out, dict):  # not an event at all: still never leak it
        return {"type": "unknown", "value": out}
    return out


def redact_text(text: str, policy: RedactionPolicy = DEFAULT_POLICY) -> str:
    """One string, as `redact` treats strings."""
    return _text(text, policy.expose_local_paths)


def _walk(value: Any, depth: int, paths: bool, mcp: bool, bodies: bool) -> Any:
    kind = type(value)
    if kind is str:
        return _text(value, paths)
    if value is None or kind is int or kind is float or kind is bool:
        return value
    if isinstance(value, Mapping):
        if depth > MAX_DEPTH:
            return DEPTH_REDACTED
        size = len(value)
        items: Iterable[tuple[Any, Any]] = value.items()
        if size > MAX_OBJECT_KEYS:
            items = islice(items, MAX_OBJECT_KEYS - 1)
        out: dict[Any, Any] = {}
        file_part = value.get("type") == "file"
        for key, item in items:
            if type(key) is str:
                role = _PATH if file_part and key == "filename" else _key_role(key)
                name = _key_text(key, paths)
                if name in out:  # two keys redacted to the same text: keep both
                    name = f"{name}#{len(out)}"
            else:
                role, name = _PLAIN, key
            if role is _PLAIN:
                out[name] = _walk(item, depth + 1, paths, mcp, bodies)
            elif role is _SECRET:
                out[name] = SECRET_REDACTED
            elif role is _MCP and not mcp:
                out[name] = MCP_REDACTED
            elif role is _ARTIFACT and not bodies:
                out[name] = ARTIFACT_REDACTED
            elif role is _DIRECTORY and not paths:
                out[name] = None
            elif (
                (role is _PATH or (role is _MCP and key in PATH_KEYS))
                and not paths
                and type(item) is str
            ):
                out[name] = LOCAL_PATH if item else item
            else:
                out[name] = _walk(item, depth + 1, paths, mcp, bodies)
        if size > MAX_OBJECT_KEYS:
            out[MORE_KEYS] = f"{size - (MAX_OBJECT_KEYS - 1)} more key(s)"
        return out
    if kind is list or kind is tuple or isinstance(value, (list, tuple)):
        if depth > MAX_DEPTH:
            return DEPTH_REDACTED
        size = len(value)
        if size > MAX_ARRAY_ITEMS:
            walked = [
                _walk(item, depth + 1, paths, mcp, bodies)
                for item in islice(value, MAX_ARRAY_ITEMS - 1)
            ]
            walked.append(f"[{size - (MAX_ARRAY_ITEMS - 1)} more item(s) redacted]")
        else:
            walked = [_walk(item, depth + 1, paths, mcp, bodies) for item in value]
        return tuple(walked) if isinstance(value, tuple) else walked
    if isinstance(value, str):  # str subclasses (enums)
        return _text(str(value), paths)
    if isinstance(value, (int, float)):  # int/float subclasses, bool included
        return value
    return UNSUPPORTED


@lru_cache(maxsize=4096)
def _key_role(key: str) -> int:
    if is_secret_key(key):
        return _SECRET
    if key in MCP_DETAIL_KEYS:
        return _MCP
    if key in PATH_KEYS:
        return _PATH
    if key in ARTIFACT_BODY_KEYS:
        return _ARTIFACT
    if key == "directory":
        return _DIRECTORY
    return _PLAIN


@lru_cache(maxsize=4096)
def _key_text(key: str, keep_paths: bool) -> str:
    return _scrub(key, keep_paths)


def _text(text: str, keep_paths: bool) -> str:
    if len(text) <= 256:
        return _short_text(text, keep_paths)
    if len(text) <= MAX_STRING_CHARS:
        return _scrub(text, keep_paths)
    return _long_text(text, keep_paths)


@lru_cache(maxsize=8192)
def _short_text(text: str, keep_paths: bool) -> str:
    # ids, types and short deltas repeat: remember them
    return _scrub(text, keep_paths)


def _long_text(text: str, keep_paths: bool) -> str:
    # Scrub a bounded head, then cut. A secret split by the head's cut sits at
    # its tail, which the final cut drops unless replacements shrank the head a
    # lot; then scrub the whole text instead (rare, and only costs time).
    head = text[: MAX_STRING_CHARS + 8192]
    out = _scrub(head, keep_paths)
    if len(out) < MAX_STRING_CHARS + 4096 and len(head) < len(text):
        out = _scrub(text, keep_paths)
    if len(out) <= MAX_STRING_CHARS:
        return out
    return out[:MAX_STRING_CHARS] + TRUNCATED


def _scrub(text: str, keep_paths: bool) -> str:
    text = scrub_text(storable_text(text))
    if not keep_paths and ("/" in text or "\\" in text or "%" in text):
        text = _LOCAL.sub(_local_marker, text)
    return text


def _local_marker(match: re.Match[str]) -> str:
    return LOCAL_FILE_URL if match.group("url") else LOCAL_PATH
