"""The Gateway registration rules of the product contract, as data in schemas/."""

from hub.auth._permissions import Principal, permissions_for
from schemas import (
    EDGE_SCOPES,
    EDGE_SYNC_SCOPES,
    EXTERNAL_SYNC_SCOPES,
    FORBIDDEN_SYNC_SCOPES,
    SCOPES_BY_KIND,
    SYNC_SCOPES_BY_KIND,
    CredentialScope,
    GatewayKind,
    GatewaySync,
    PrincipalKind,
    SyncScope,
    subjects,
    versions,
)

REGISTRATION = {
    "gateway.registration.heartbeat",
    "gateway.registration.capabilities",
    "gateway.registration.metadata_sync",
}


def test_scopes_derived_from_each_kind_match_the_contract():
    assert {str(s) for s in SCOPES_BY_KIND[GatewayKind.EXTERNAL_WORKSPACE]} == REGISTRATION
    assert {str(s) for s in SCOPES_BY_KIND[GatewayKind.EDGE_WORKER]} == {
        "gateway.registration.heartbeat",
        "gateway.registration.capabilities",
        "gateway.edge.claim",
        "gateway.edge.lease_renew",
        "gateway.edge.write_fenced_output",
    }
    assert SCOPES_BY_KIND[GatewayKind.EXTERNAL_WORKSPACE_EDGE_WORKER] == frozenset(CredentialScope)
    assert not EDGE_SCOPES & SCOPES_BY_KIND[GatewayKind.EXTERNAL_WORKSPACE]


def test_sync_scopes_are_split_by_lane_and_never_forbidden():
    assert EXTERNAL_SYNC_SCOPES | EDGE_SYNC_SCOPES == frozenset(SyncScope)
    assert not EXTERNAL_SYNC_SCOPES & EDGE_SYNC_SCOPES
    assert not {str(s) for s in SyncScope} & FORBIDDEN_SYNC_SCOPES
    assert SYNC_SCOPES_BY_KIND[GatewayKind.EDGE_WORKER] == EDGE_SYNC_SCOPES
    assert "raw_local_paths" in FORBIDDEN_SYNC_SCOPES and len(FORBIDDEN_SYNC_SCOPES) == 9


def test_a_forbidden_scope_still_parses_so_the_hub_can_say_why_it_refuses():
    assert GatewaySync(scope="raw_provider_keys", items=[]).scope == "raw_provider_keys"


def test_an_external_only_gateway_can_neither_claim_nor_write_work():
    principal = Principal(
        PrincipalKind.GATEWAY, "acme", "gw1", scopes=SCOPES_BY_KIND[GatewayKind.EXTERNAL_WORKSPACE]
    )
    allowed = permissions_for(principal)
    claim = subjects.WORK_CLAIM.build(tenant="acme", registration_id="gw1")
    output = subjects.WORK_OUTPUT.build(tenant="acme", registration_id="gw1")
    assert claim not in allowed.pub_allow and output not in allowed.pub_allow
    assert subjects.GATEWAY_SYNC.filter(tenant="acme", registration_id="gw1") in allowed.pub_allow


def test_contract_versions_are_major_minor():
    for value in (
        versions.BUS_PROTOCOL,
        versions.EVENT_CONTRACT,
        versions.PROJECTION_CONTRACT,
        versions.CHECKPOINT_SCHEMA,
    ):
        major, minor = value.split(".")
        assert major.isdigit() and minor.isdigit()
