"""What the edge-work modules share: the refusal type and the registration checks
every Gateway request starts with (read under a row lock by the caller)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

import asyncpg

from schemas import EDGE_WORK_REFUSED_TRUST, CredentialScope, GatewayKind

from ..core import Refusal

TERMINAL = ("revoked", "retired")
EDGE_KINDS = (GatewayKind.EDGE_WORKER.value, GatewayKind.EXTERNAL_WORKSPACE_EDGE_WORKER.value)


class EdgeWorkError(Refusal):
    """A refused edge-work request (admin API and the workers' bus requests)."""


def registration_refusal(
    reg: Mapping[str, Any] | None, scope: CredentialScope, operation: str
) -> EdgeWorkError | None:
    """Why this registration may not `operation` at all, whatever its state (None: it may)."""
    if reg is None:
        return _unknown_registration()
    if reg["status"] in TERMINAL:
        return EdgeWorkError(
            f"gateway.{reg['status']}",
            f"the registration is {reg['status']}: nothing is accepted from it",
        )
    if reg["kind"] not in EDGE_KINDS:
        return EdgeWorkError(
            "gateway.not_edge_worker", f"a {reg['kind']} registration does not run Cloud work"
        )
    if reg["trust_model"] in EDGE_WORK_REFUSED_TRUST:
        return EdgeWorkError(
            "gateway.trust_deferred",
            f"edge work is not allowed under trust model {reg['trust_model']}",
        )
    if scope.value not in reg["scopes"]:
        code = {"claim": "gateway.no_claim_scope", "renew": "gateway.no_renew_scope"}.get(
            operation, "gateway.no_write_scope"
        )
        return EdgeWorkError(code, f"the registration's credential lacks scope {scope.value}")
    return None


def _unknown_registration() -> EdgeWorkError:
    return EdgeWorkError("gateway.unknown", "no such gateway registration")


def usable_registration(
    reg: asyncpg.Record | None, scope: CredentialScope, operation: str
) -> asyncpg.Record:
    """`reg` when it may `operation` at all (else its `registration_refusal` is raised)."""
    if reg is None:
        raise _unknown_registration()
    refusal = registration_refusal(reg, scope, operation)
    if refusal is not None:
        raise refusal
    return reg


def check_holder(work: Mapping[str, Any] | None, reg_id: str, token: str, work_id: str) -> None:
    """The caller must hold the current lease: same owner and, in constant time, token."""
    if work is None:
        raise EdgeWorkError("work.not_found", f"no work {work_id!r}")
    current = (work["lease_token"] or "").encode()
    same = hmac.compare_digest(current, token.encode())
    if not same or work["owner"] != reg_id:
        raise EdgeWorkError("work.stale_lease", "the lease token is not the current one")
