"""Heartbeat packets and the observer's gap arithmetic, and the bindings that keep a guest from speaking for
another VM."""

import asyncio
import json
import socket
from pathlib import Path

import pytest

from testbed.errors import InputError
from testbed.guest.heartbeat import SIZE, Heartbeat, pack, parse
from testbed.lab import observer as obs
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


# --- heartbeats bound to their VM (issue 17): a guest cannot speak for another -------------------------------



def named(vm: str, seq: int) -> Heartbeat:
    return Heartbeat(version=1, flags=0, seq=seq, guest_ns=seq, mem_pages_written=0, mem_pages_verified=0,
                     mem_errors=0, disk_seq=0, disk_errors=0, vm=vm)


def test_a_bound_vm_takes_heartbeats_only_from_its_address(tmp_path: Path) -> None:
    o = obs.Observer(tmp_path / "b.json")
    o.bind("web01", "198.19.16.3/16")
    assert o.take(1.0, named("web01", 1), "198.19.16.3")
    assert not o.take(1.1, named("web01", 99), "198.19.16.4")       # another guest claims web01
    assert not o.take(1.2, named("web01", 100), "198.19.16.4")
    assert o.take(1.3, named("db01", 1), "198.19.16.4")              # unbound names: from anywhere, as before
    st = o.tracks["web01"].stats(None, None, 20)
    assert st["count"] == 1 and st["last"]["seq"] == 1 and st["sources"] == {"198.19.16.3": 1}
    assert o.spoofed == {"web01": {"198.19.16.4": 2}} and o.spoofed_total == 2
    assert o.answer({"op": "stats", "vm": "web01"})["spoofed"] == 2
    o.unbind("web01")
    assert o.take(1.4, named("web01", 101), "198.19.16.4")


def test_bindings_survive_a_restart_and_a_reused_address_moves(tmp_path: Path) -> None:
    f = tmp_path / "b.json"
    o = obs.Observer(f)
    o.bind("web01", "198.19.16.3")
    assert o.bind("web02", "198.19.16.3")["replaced"] == ["web01"]  # the address was handed out again
    again = obs.Observer(f)
    assert again.bindings == {"web02": "198.19.16.3"}
    f.write_text("{not json")                                        # a damaged file: start unbound, not dead
    assert obs.Observer(f).bindings == {}
    f.write_text(json.dumps({"../x": "198.19.16.3", "web03": "10.0.0.1"}))
    assert obs.Observer(f).bindings == {}                            # nothing half-believed from a bad file


@pytest.mark.parametrize(("vm", "address"), [("../x", "198.19.16.3"), ("/", "198.19.16.3"), ("web01", "10.0.0.1"),
                                             ("web01", "198.19.0.0"), ("web01", "not-an-ip"), (None, "198.19.1.1"),
                                             ("a" * 40, "198.19.1.1")])
def test_a_bad_binding_is_refused(tmp_path: Path, vm: object, address: object) -> None:
    o = obs.Observer(tmp_path / "b.json")
    with pytest.raises((ValueError, InputError)) as ei:
        o.answer({"op": "bind", "vm": vm, "address": address})
    assert "not" in str(ei.value)
    assert o.bindings == {} and not (tmp_path / "b.json").exists()


async def test_spoofed_packets_through_the_real_socket_are_counted_not_believed(tmp_path: Path) -> None:
    """Real UDP datagrams and the observer's control socket: bind web01 to its VM address, then send from
    127.0.0.1 claiming web01 (ignored, counted) and claiming an unbound name (taken)."""
    o = obs.Observer(obs.bindings_file(tmp_path / "observer.sock"))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, obs.SO_TIMESTAMPNS, 1)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    control = tmp_path / "observer.sock"
    server = await asyncio.start_unix_server(o.control, path=str(control))
    loop = asyncio.get_running_loop()
    loop.add_reader(rx.fileno(), o.on_readable, rx)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        async with server:
            await obs.set_binding(control, "web01", "198.19.16.3/16")
            with pytest.raises(RuntimeError, match="not allowed"):
                await obs.set_binding(control, "../x", "198.19.16.4")
            for seq in range(1, 6):
                tx.sendto(pack(named("web01", seq)), rx.getsockname())
                tx.sendto(pack(named("db01", seq)), rx.getsockname())
            for _ in range(100):
                await asyncio.sleep(0.01)
                if o.received >= 10:
                    break
            vms = await obs.query(control, {"op": "vms"})
            assert vms["received"] == 10
            assert vms["spoofed"] == {"web01": {"127.0.0.1": 5}} and vms["spoofed_total"] == 5
            assert "web01" not in vms["vms"] and vms["vms"]["db01"]["count"] == 5
            assert (await obs.query(control, {"op": "stats", "vm": "web01"}))["count"] == 0
            assert json.loads(obs.bindings_file(control).read_text()) == {"web01": "198.19.16.3"}
            await obs.set_binding(control, "web01", None)
            assert (await obs.query(control, {"op": "bindings"}))["bindings"] == {}
    finally:
        loop.remove_reader(rx.fileno())
        rx.close()
        tx.close()
