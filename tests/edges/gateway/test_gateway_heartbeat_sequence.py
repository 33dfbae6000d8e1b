"""A Gateway's heartbeat sequence (edges/gateway/_store.py): strictly increasing
across restarts and crashes, which the hub relies on to refuse a replayed or
stale beat, while written to disk once a block, not once a beat."""

from __future__ import annotations

from edges.gateway._store import HEARTBEAT_BLOCK, GatewayStore

NOW = 1_765_000_000_000  # wall-clock milliseconds
BEAT = 5_000  # a beat every 5 s


def _stored(store: GatewayStore) -> int:
    row = store.db.execute("SELECT value FROM counters WHERE name = 'heartbeat'").fetchone()
    return row[0]


def test_sequences_rise_across_crashes_with_one_write_a_block(tmp_path):
    store = GatewayStore(tmp_path / "gw")
    assert not store.heartbeat_sequence_reserved(NOW), "nothing reserved yet: a write"
    first = store.next_heartbeat_sequence(NOW)
    assert store.heartbeat_sequence_reserved(NOW + BEAT)
    assert first == NOW, "a fresh directory starts at the wall clock"
    writes = store.db.total_changes
    beats = HEARTBEAT_BLOCK // BEAT  # a block's worth of beats at the wall clock
    handed = [first] + [store.next_heartbeat_sequence(NOW + i * BEAT) for i in range(1, beats)]
    assert handed == sorted(set(handed)), "strictly increasing"
    assert store.db.total_changes == writes, "no write within the reserved block"
    assert _stored(store) >= handed[-1]
    assert not store.heartbeat_sequence_reserved(NOW + beats * BEAT), "the block is used up"
    store.next_heartbeat_sequence(NOW + beats * BEAT)
    assert store.db.total_changes == writes + 1, "one write for the next block"
    last = store.next_heartbeat_sequence(NOW + beats * BEAT + 1)
    store.close()  # a crash: nothing is written on the way out

    again = GatewayStore(tmp_path / "gw")
    # The clock went back (or the restart came at once): still after every number sent.
    after = [again.next_heartbeat_sequence(NOW) for _ in range(3)]
    assert after[0] > last and after == sorted(set(after))
    assert after[0] <= last + HEARTBEAT_BLOCK, "at most a block ahead"
    # The wall clock wins again once it is ahead of the reserved block.
    later = NOW + 10 * HEARTBEAT_BLOCK
    assert again.next_heartbeat_sequence(later) == later
    again.close()


def test_a_value_stored_by_an_earlier_version_is_respected(tmp_path):
    """Before blocks, the stored value was the last sequence sent: still honoured."""
    store = GatewayStore(tmp_path / "gw")
    store.db.execute("INSERT INTO counters (name, value) VALUES ('heartbeat', ?)", (NOW + 99,))
    store.db.commit()
    assert store.next_heartbeat_sequence(NOW) == NOW + 100
    store.close()
