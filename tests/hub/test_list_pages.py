"""The admin lists that were returned whole are paged like the others (`limit`,
`cursor` -> `nextCursor`, null on the last page): bus principals (one per paired
Desktop and registered Gateway), a channel instance's chat users and the tenant's
channel instances. Every row comes once, in the list's order, filters apply across
pages, and a cursor the API did not give is a 400."""

from __future__ import annotations

import pytest
from desktopkit import all_pages

from hub.auth import _jwt
from hub.auth._permissions import Principal
from schemas import ChannelInstanceList, ChannelUserList, PrincipalKind, PrincipalList

TENANT = "pager"
BASE = f"/api/v1/tenants/{TENANT}"


def _cli(instance_id: str) -> dict:
    """A `cli` channel instance (no platform behind it)."""
    return {
        "instanceId": instance_id,
        "kind": "cli",
        "workspaceId": "ws-pager",
        "authority": "cloud_worker",
    }


async def test_principals_come_a_page_at_a_time_newest_first(hub, http):
    ids = [f"desk-{i}" for i in range(7)]
    for pid in ids:
        await hub.credentials.issue(
            Principal(PrincipalKind.DESKTOP, TENANT, pid), _jwt.public_key(_jwt.new_seed("user"))
        )
    await hub.credentials.issue(
        Principal(PrincipalKind.VIEWER, TENANT, "watcher"), _jwt.public_key(_jwt.new_seed("user"))
    )
    await hub.credentials.revoke(TENANT, "desktop", "desk-3", reason="test")
    items, pages = await all_pages(http, f"{BASE}/principals", 3)
    assert pages == 3 and len(items) == 8
    assert [p["principalId"] for p in items] == ["watcher", *reversed(ids)]
    assert all(p["keys"] == 1 for p in items)
    desktops, pages = await all_pages(http, f"{BASE}/principals", 2, kind="desktop")
    assert [p["principalId"] for p in desktops] == list(reversed(ids)) and pages == 4
    revoked, _ = await all_pages(http, f"{BASE}/principals", 2, status="revoked")
    assert [p["principalId"] for p in revoked] == ["desk-3"]
    page = (await http.get(f"{BASE}/principals", params={"limit": 100})).json()
    assert PrincipalList.model_validate(page).next_cursor is None


async def test_chat_users_come_a_page_at_a_time_as_first_seen(hub, http):
    response = await http.post(f"{BASE}/channel-instances", json=_cli("cli-pager"))
    assert response.status_code == 201, response.text
    await hub.pool.executemany(
        "INSERT INTO channel_users (tenant, instance_id, provider_user_id, role, first_seen_at) "
        "VALUES ($1, 'cli-pager', $2, $3, now() - make_interval(secs => $4))",
        [(TENANT, f"u{i}", "member" if i % 2 else "pending", 100 - i) for i in range(9)],
    )
    path = f"{BASE}/channel-instances/cli-pager/users"
    users, pages = await all_pages(http, path, 4, key="users")
    assert [u["providerUserId"] for u in users] == [f"u{i}" for i in range(9)] and pages == 3
    members, _ = await all_pages(http, path, 2, key="users", role="member")
    assert [u["providerUserId"] for u in members] == ["u1", "u3", "u5", "u7"]
    whole = (await http.get(path, params={"limit": 1000})).json()
    assert ChannelUserList.model_validate(whole).next_cursor is None
    assert (await http.get(path, params={"role": "emperor"})).status_code == 400


async def test_channel_instances_come_a_page_at_a_time_by_id(http):
    made = [f"cli-{c}" for c in "fbdaec"]
    for instance_id in made:
        response = await http.post(f"{BASE}/channel-instances", json=_cli(instance_id))
        assert response.status_code == 201, response.text
    items, pages = await all_pages(http, f"{BASE}/channel-instances", 4)
    listed = [i["instanceId"] for i in items if i["instanceId"] in made]
    assert listed == sorted(made) and pages >= 2
    whole = (await http.get(f"{BASE}/channel-instances", params={"limit": 1000})).json()
    assert ChannelInstanceList.model_validate(whole).next_cursor is None


async def test_channel_instances_are_filtered_across_pages(http):
    """By kind, workspace, enabled and a part of the display name (any case, taken
    literally), each across pages; an unknown kind is a 400 naming the kinds."""
    made = {
        "flt-a": {"displayName": "Support 50%_desk", "workspaceId": "ws-flt-1"},
        "flt-b": {"displayName": "support line", "workspaceId": "ws-flt-1"},
        "flt-c": {"displayName": "Sales", "workspaceId": "ws-flt-2"},
        "flt-d": {"displayName": "SUPPORT night", "workspaceId": "ws-flt-2"},
    }
    for instance_id, fields in made.items():
        response = await http.post(
            f"{BASE}/channel-instances", json={**_cli(instance_id), **fields}
        )
        assert response.status_code == 201, response.text
    off = await http.patch(f"{BASE}/channel-instances/flt-d", json={"enabled": False})
    assert off.status_code == 200, off.text

    async def ids(**params: str) -> list[str]:
        items, _ = await all_pages(http, f"{BASE}/channel-instances", 1, **params)
        return [i["instanceId"] for i in items if i["instanceId"].startswith("flt-")]

    assert await ids(label="SUPPORT") == ["flt-a", "flt-b", "flt-d"]
    assert await ids(label="50%_") == ["flt-a"]
    assert await ids(label="50%x") == []
    assert await ids(workspaceId="ws-flt-2") == ["flt-c", "flt-d"]
    assert await ids(enabled="false") == ["flt-d"]
    assert await ids(label="support", enabled="true", workspaceId="ws-flt-1") == [
        "flt-a",
        "flt-b",
    ]
    assert await ids(kind="cli") == list(made)
    items, _ = await all_pages(http, f"{BASE}/channel-instances", 2, kind="telegram")
    assert all(i["kind"] == "telegram" for i in items)
    bad = await http.get(f"{BASE}/channel-instances", params={"kind": "pigeon"})
    assert bad.status_code == 400 and "telegram" in bad.text
    bad = await http.get(f"{BASE}/channel-instances", params={"enabled": "sometimes"})
    assert bad.status_code == 400


@pytest.mark.parametrize(
    "path", ["principals", "channel-instances", "channel-instances/cli-pager/users"]
)
# not base64 JSON; [1]; []; ["a\u0000b"] (a NUL no id of ours holds)
@pytest.mark.parametrize("cursor", ["garbage", "WzFd", "W10", "WyJhXHUwMDAwYiJd"])
async def test_a_cursor_the_api_did_not_give_is_a_400(http, path, cursor):
    await http.post(f"{BASE}/channel-instances", json=_cli("cli-pager"))  # (or 409: made)
    response = await http.get(f"{BASE}/{path}", params={"cursor": cursor})
    assert response.status_code == 400, response.text
    assert "cursor" in response.text


@pytest.mark.parametrize(
    "path, params",
    [
        ("pairings", {"label": "desk\x00"}),
        ("gateway-registrations", {"label": "\x00"}),
        ("audit", {"actorId": "admin\x00"}),
        ("channel-instances/cli%00pager/users", {}),
    ],
)
async def test_a_nul_in_the_path_or_query_is_a_400_not_a_500(http, path, params):
    """PostgreSQL text holds no NUL: refused at the door with what is wrong."""
    response = await http.get(f"{BASE}/{path}", params=params)
    assert response.status_code == 400, response.text
    assert "NUL" in response.json()["error"]["message"]
