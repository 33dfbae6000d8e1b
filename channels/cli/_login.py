"""`cowork channel login`: a credential file for a CLI channel instance.

The key pair is made here and its seed never leaves this machine: only the
public key goes to the hub's admin API (`POST …/channel-instances/{id}/credentials`),
which answers with a user JWT bound to that key, the instance and its workspace.
The `.creds` file is written 0600, ready for `cowork channel cli --creds FILE`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import nkeys

from schemas import render_creds

EXIT_USAGE, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_WRITE = 2, 3, 4, 6


class LoginFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_login_command(sub: Any, token_type: Any) -> None:
    login = sub.add_parser(
        "login",
        help="get a credential file for a CLI or outbound-transport channel instance",
        description="Make a key pair here, have the hub sign a credential for its public key "
        "(admin API), and write a .creds file (0600) for `cowork channel cli`.",
    )
    login.add_argument(
        "instance",
        metavar="INSTANCE",
        type=token_type("instance_id"),
        help="the channel instance id (kind cli)",
    )
    login.add_argument(
        "--hub-url",
        default=os.environ.get("COWORK_HUB_HTTP_URL", "http://127.0.0.1:8080"),
        metavar="URL",
        help="the hub's HTTP URL (default: $COWORK_HUB_HTTP_URL or http://127.0.0.1:8080)",
    )
    login.add_argument("--tenant", required=True, type=token_type("tenant"), help="the tenant id")
    login.add_argument(
        "--creds-out",
        required=True,
        type=Path,
        metavar="FILE",
        help="where to write the .creds file (refuses to overwrite)",
    )
    login.add_argument(
        "--ttl-seconds",
        type=int,
        default=None,
        metavar="N",
        help="credential lifetime (default: the hub's edge credential TTL)",
    )
    login.set_defaults(channel_handler=run_login)


def run_login(args: argparse.Namespace) -> int:
    token = os.environ.get("COWORK_ADMIN_TOKEN")
    try:
        if not token:
            raise LoginFailed("set COWORK_ADMIN_TOKEN to the hub's admin token", EXIT_USAGE)
        if args.creds_out.exists():
            raise LoginFailed(
                f"{args.creds_out} exists; remove it or choose another path", EXIT_USAGE
            )
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        answer = _request(args, token, nkeys.from_seed(bytearray(seed)).public_key.decode())
        _write(args.creds_out, render_creds(answer["userJwt"], seed))
    except LoginFailed as exc:
        print(f"cowork: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"Wrote {args.creds_out} (valid until {answer['expiresAt']}).")
    nats_url = answer.get("natsUrl") if isinstance(answer.get("natsUrl"), str) else None
    print(
        f"Next: cowork channel cli {args.instance} --tenant {args.tenant} "
        f"--creds {args.creds_out} --nats {nats_url or 'nats://HOST:4222'}"
    )
    print(
        f"  (an instance with transport 'outbound': cowork channel run {args.instance} "
        f"--tenant {args.tenant} --creds {args.creds_out} "
        f"--nats {nats_url or 'nats://HOST:4222'} --config SETTINGS.json)"
    )
    if answer.get("workspaceId"):
        print(
            f"(the credential is bound to workspace {answer['workspaceId']}; a chat user "
            "needs a claim code: POST …/channel-claim-codes, then /claim CODE)"
        )
    return 0


def _request(args: argparse.Namespace, token: str, public_key: str) -> dict[str, Any]:
    url = (
        f"{args.hub_url.rstrip('/')}/api/v1/tenants/{args.tenant}/channel-instances/"
        f"{args.instance}/credentials"
    )
    body: dict[str, Any] = {"publicKey": public_key}
    if args.ttl_seconds is not None:
        body["ttlSeconds"] = args.ttl_seconds
    try:
        response = httpx.post(
            url, json=body, timeout=15, headers={"Authorization": f"Bearer {token}"}
        )
    except httpx.HTTPError as exc:
        raise LoginFailed(
            f"cannot reach the hub at {args.hub_url}: {type(exc).__name__}", EXIT_UNREACHABLE
        ) from None
    if response.status_code != 201:
        raise LoginFailed(
            f"the hub refused ({response.status_code}): {_reason(response)}", EXIT_REFUSED
        )
    answer = response.json()
    if not isinstance(answer, dict) or not isinstance(answer.get("userJwt"), str):
        raise LoginFailed("the hub's answer carries no credential", EXIT_REFUSED)
    return answer


def _reason(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


def _write(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    except OSError as exc:
        raise LoginFailed(f"cannot write {path}: {exc.strerror}", EXIT_WRITE) from None
