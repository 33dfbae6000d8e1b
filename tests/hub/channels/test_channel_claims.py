"""The router's batch claim (hub/channels/_claims.py): one statement per fetched
batch; the first insert of a key wins, a key already claimed keeps its row."""

from __future__ import annotations

import pytest
from routerkit import TENANT, Kit

from hub.channels._claims import claim_all, claim_key


@pytest.fixture
async def kit(hub):
    return Kit(hub)


async def test_batch_claim_first_insert_wins_and_existing_rows_are_returned(kit, http):
    inst = await kit.instance(http)
    old = kit.inbound(inst, "already seen")
    pool = kit.hub.pool
    first = await claim_all(pool, [(TENANT, old)])
    assert first[claim_key(TENANT, old)]["status"] == "claimed"
    await pool.execute(
        "UPDATE channel_inbound_claims SET status = 'done' WHERE tenant = $1 "
        "AND provider_event_id = $2",
        TENANT,
        old.provider_event_id,
    )

    new = kit.inbound(inst, "fresh")
    # The same event again under another message id (a re-sent update): same key.
    twin = new.model_copy(update={"id": new.id[:-4] + "zzzz"})
    rows = await claim_all(pool, [(TENANT, old), (TENANT, new), (TENANT, twin)])
    assert len(rows) == 2
    assert rows[claim_key(TENANT, old)]["status"] == "done"
    fresh = rows[claim_key(TENANT, new)]
    assert fresh["status"] == "claimed" and fresh["message_id"] == new.id  # first one won
    count = await pool.fetchval(
        "SELECT count(*) FROM channel_inbound_claims WHERE tenant = $1 AND instance_id = $2",
        TENANT,
        inst["instance_id"],
    )
    assert count == 2
    assert await claim_all(pool, []) == {}
