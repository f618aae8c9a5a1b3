"""Heartbeat packets and the observer's gap arithmetic."""

from testbed.guest.heartbeat import SIZE, Heartbeat, pack, parse
from testbed.lab.observer import Track


def hb(seq: int, **kw: int) -> Heartbeat:
    fields = dict(version=1, flags=0, seq=seq, guest_ns=seq * 1_000_000, mem_pages_written=0,
                  mem_pages_verified=0, mem_errors=0, disk_seq=0, disk_errors=0)
    fields.update(kw)
    return Heartbeat(vm="web01", **fields)  # type: ignore[arg-type]


def test_roundtrip_and_size() -> None:
    data = pack(hb(7, mem_errors=1))
    assert len(data) == SIZE == 96
    back = parse(data)
    assert back == hb(7, mem_errors=1)
    assert back is not None and back.violation


def test_garbage_is_not_a_heartbeat() -> None:
    assert parse(b"hello") is None
    assert parse(b"XXXX" + bytes(92)) is None


def test_gaps_and_losses() -> None:
    tr = Track()
    t = 100.0
    for seq in range(1, 101):
        tr.add(t, hb(seq), "198.19.1.1")
        t += 0.001
    t += 0.150                      # a 151 ms stall ...
    for seq in range(111, 121):     # ... in which 10 heartbeats were lost
        tr.add(t, hb(seq), "198.19.1.1")
        t += 0.001
    st = tr.stats(None, None, threshold_ms=20)
    assert st["count"] == 110 and st["lost"] == 10
    assert 150 < st["max_gap_ms"] < 152
    assert len(st["gaps"]) == 1 and st["gaps"][0]["seq_before"] == 100
    assert tr.stats(100.2, None, 20)["count"] == 10 - 0   # only the tail


def test_last_of_a_window_is_that_windows_newest_heartbeat() -> None:
    """The engine compares the guest after the move with its last heartbeat *before* the pause."""
    tr = Track()
    for seq, t in ((1, 10.0), (2, 10.001), (3, 10.002), (4, 12.5)):
        tr.add(t, hb(seq), "198.19.1.1")
    assert tr.stats(9.0, 10.0015, 20)["last"]["seq"] == 2
    assert tr.stats(9.0, 11.0, 20)["last"]["seq"] == 3
    assert tr.stats(9.0, None, 20)["last"]["seq"] == 4
    assert tr.stats(1.0, 2.0, 20)["last"] is None
