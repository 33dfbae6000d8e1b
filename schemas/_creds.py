"""The standard NATS `.creds` file format (pure text; no I/O).

Defined once, here, because both sides use it: the hub writes creds for tests
and tools, and an edge stores its own credential as `<state-dir>/desktop.creds`,
usable by any NATS client.
"""

from __future__ import annotations

import re

_TEMPLATE = """\
-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""
_PARSE = re.compile(
    r"-----BEGIN NATS USER JWT-----\s*(?P<jwt>\S+)\s*------END NATS USER JWT------.*?"
    r"-----BEGIN USER NKEY SEED-----\s*(?P<seed>\S+)\s*------END USER NKEY SEED------",
    re.S,
)


def render_creds(user_jwt: str, seed: bytes) -> str:
    # nats-py reads the line right after each BEGIN marker, so nothing is wrapped.
    return _TEMPLATE.format(jwt=user_jwt.strip(), seed=bytes(seed).decode().strip())


def parse_creds(text: str) -> tuple[str, bytes]:
    """(user JWT, seed) from a `.creds` file's text, or ValueError."""
    match = _PARSE.search(text)
    if not match:
        raise ValueError("not a NATS .creds file")
    return match["jwt"], match["seed"].encode()


def nats_conf_string(value: object) -> str:
    """A double-quoted NATS config string (the syntax accepts JSON-style escapes)."""
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
