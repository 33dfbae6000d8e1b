"""The Desktop's on-disk state: the bounded outbox and the command journal."""

import os
import stat

from edges import DesktopStore


def _items(start: int, count: int) -> list[tuple[str, str, bytes]]:
    return [
        ("cw.acme.device.d.evt.session", f"evt-{i}", f"data-{i}".encode())
        for i in range(start, start + count)
    ]


def test_outbox_keeps_order_and_drops_the_oldest_past_its_bound(tmp_path):
    store = DesktopStore(tmp_path, max_outbox=5)
    assert store.outbox_append(_items(0, 3)) == 0
    assert store.outbox_append(_items(3, 4)) == 2
    assert store.outbox_size() == 5
    assert [row[2] for row in store.outbox_peek(10)] == [f"evt-{i}" for i in range(2, 7)]
    store.outbox_remove_through(store.outbox_peek(2)[-1][0])
    assert store.outbox_size() == 3
    assert [row[2] for row in store.outbox_peek(10)] == ["evt-4", "evt-5", "evt-6"]
    store.outbox_remove_through(store.outbox_peek(10)[-1][0])
    assert store.outbox_size() == 0 and store.outbox_peek(10) == []
    assert store.outbox_append(_items(7, 1)) == 0 and store.outbox_size() == 1
    store.close()


def test_outbox_and_journal_survive_a_restart(tmp_path):
    store = DesktopStore(tmp_path)
    store.outbox_append(_items(0, 2))
    store.command_started("cmd-1", 1, "status")
    store.command_started("cmd-2", 2, "prompt")
    store.command_done("cmd-2", {"ok": True, "status": "queued"})
    store.close()
    again = DesktopStore(tmp_path)
    assert again.outbox_size() == 2
    assert again.command_record("cmd-1") == ("started", None)
    assert again.command_record("cmd-2") == ("done", {"ok": True, "status": "queued"})
    assert again.command_record("cmd-3") is None
    assert again.last_command_sequence() == 2
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o700
    again.close()
