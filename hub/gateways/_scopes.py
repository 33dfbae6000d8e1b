"""What a new registration may be: the credential and sync scopes its kind and
trust model allow, narrowed by the administrator (pure; no database)."""

from __future__ import annotations

from schemas import (
    EDGE_SCOPES,
    EDGE_WORK_REFUSED_TRUST,
    FORBIDDEN_SYNC_SCOPES,
    SCOPES_BY_KIND,
    SYNC_SCOPES_BY_KIND,
    CredentialScope,
    SyncScope,
)

from ._common import GatewayError


def derive_scopes(
    kind: str,
    trust_model: str,
    scopes: list[str] | None,
    sync_scopes: list[str] | None,
    approved_credentials: list[str],
) -> tuple[list[str], list[str]]:
    """The credential and sync scopes of a new registration, or GatewayError(422)
    naming what is wrong with the combination."""
    edge_kind = bool(SCOPES_BY_KIND[kind] & EDGE_SCOPES)
    if edge_kind and trust_model in EDGE_WORK_REFUSED_TRUST:
        raise GatewayError(
            "gateway.trust_refuses_edge_work",
            f"kind {kind} runs Cloud-owned edge work, which trust model "
            f"{trust_model} refuses (metadata only): use kind "
            "external_workspace or another trust model",
            status=422,
        )
    granted = _narrow_scopes(kind, scopes)
    if approved_credentials and not edge_kind:
        raise GatewayError(
            "gateway.credentials_need_edge_kind",
            f"approvedCredentials only apply to edge work; kind {kind} runs none",
            status=422,
        )
    return granted, _narrow_sync_scopes(kind, sync_scopes)


def _narrow_scopes(kind: str, scopes: list[str] | None) -> list[str]:
    allowed = SCOPES_BY_KIND[kind]
    if scopes is None:
        return sorted(str(s) for s in allowed)
    known = {s.value for s in CredentialScope}
    unknown = sorted(set(scopes) - known)
    if unknown:
        raise GatewayError(
            "gateway.scope_unknown",
            f"unknown credential scopes {unknown}; known: {sorted(known)}",
            status=422,
        )
    outside = sorted(set(scopes) - allowed)
    if outside:
        raise GatewayError(
            "gateway.scope_outside_kind",
            f"kind {kind} may not hold {outside}; it may hold {sorted(str(s) for s in allowed)}",
            status=422,
        )
    if CredentialScope.HEARTBEAT not in scopes:
        raise GatewayError(
            "gateway.scope_heartbeat_required",
            f"{CredentialScope.HEARTBEAT.value} cannot be narrowed away: a "
            "Gateway the hub does not hear from is marked unhealthy",
            status=422,
        )
    return sorted(set(scopes))


def _narrow_sync_scopes(kind: str, sync_scopes: list[str] | None) -> list[str]:
    allowed = SYNC_SCOPES_BY_KIND[kind]
    if sync_scopes is None:
        return sorted(str(s) for s in allowed)
    forbidden = sorted(set(sync_scopes) & FORBIDDEN_SYNC_SCOPES)
    if forbidden:
        raise GatewayError(
            "gateway.sync_scope_forbidden",
            f"sync scopes {forbidden} are always forbidden: raw databases, "
            "runtime homes, local paths, keys, secrets and private files "
            "never leave a Gateway",
            status=422,
        )
    unknown = sorted(set(sync_scopes) - {s.value for s in SyncScope})
    if unknown:
        raise GatewayError(
            "gateway.sync_scope_unknown", f"unknown sync scopes {unknown}", status=422
        )
    outside = sorted(set(sync_scopes) - allowed)
    if outside:
        raise GatewayError(
            "gateway.sync_scope_outside_kind",
            f"kind {kind} may not sync {outside}; it may sync {sorted(str(s) for s in allowed)}",
            status=422,
        )
    return sorted(set(sync_scopes))
