"""The status board (fastws/metrics.py): a worker's slot and its table of servers' figures."""

from __future__ import annotations

from fastws import metrics


def test_a_server_that_left_leaves_a_tombstone_a_new_one_takes():
    board = metrics.Board(2)
    slot = board.take()
    assert slot is not None
    keys = [metrics.peer_key("app", f"10.0.0.{i}:80") for i in range(3)]
    for n, key in enumerate(keys):
        slot.v[slot.peer_offset(key) + 2] = 10 + n                  # tunnels_total
    slot.forget_peers({keys[1]})
    assert [key for key, _ in slot.peers()] == [keys[0], keys[2]]    # no entry moved
    assert [slot.v[off + 2] for _, off in slot.peers()] == [10, 12]
    new = metrics.peer_key("app", "10.0.0.9:80")
    off = slot.peer_offset(new)
    assert off == metrics.PEERS_AT + len(metrics.PEER)                # the tombstone's place
    assert slot.v[off + 2] == 0
    assert [key for key, _ in slot.peers()] == [keys[0], new, keys[2]]
    board.retire(slot)                                                # summed into slot 0
    total = board.slots[0]
    assert sorted(total.v[o + 2] for _, o in total.peers()) == [0, 10, 12]
