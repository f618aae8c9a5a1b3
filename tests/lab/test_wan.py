"""The long-distance link: delay, loss, bandwidth and cut/restore take effect on real traffic (ping and
TCP between host namespaces, VM traffic over VXLAN), and live migrations cross it (relocates through the
vCenters): one completes at 50 ms RTT with integrity verified, one whose link is cut in pre-copy rolls back
cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import labctl
from testbed.lab.topology import LinkSpec, default_topology
from testbed.net import fabric, probe, wan
from testbed.net.cmd import socket_in_netns
from testbed.vcenter import deploy
from testbed.vcenter.labvms import LabVms

from ..conftest import unique_lab_name
from .labkit import HAPPY, boot, lab_vms, report_of, rollback_case

pytestmark = pytest.mark.lab
MiB = 1024**2
A1_VMK, B1_VMK, B1_MGMT = "198.18.16.11", "198.18.17.11", "198.18.1.11"


@pytest.fixture(scope="module")
def wlab(lab_env: Path) -> Iterator[str]:
    """Two sites joined by the WAN; jumbo frames on the vMotion network (as vMotion networks use)."""
    name = unique_lab_name()
    t = default_topology(name).model_copy(update={"link": LinkSpec(mtu=9000)})
    try:
        asyncio.run(deploy.up(t))
        yield name
    finally:
        labctl.down(name)


@pytest.fixture
def link(wlab: str) -> Iterator[str]:
    """The lab's link, put back to no delay, no loss, uncapped, restored, after the test."""
    yield wlab
    labctl.set_link(wlab, up=True, delay_us=0, jitter_us=0, loss_ppm=0, change_bandwidth=True, bandwidth_bps=None,
                    tcp_buffers="topology")


@pytest.fixture
async def wvms(wlab: str) -> AsyncIterator[LabVms]:
    async with lab_vms(wlab) as m:
        yield m


def ns(lab: str, node: str) -> str:
    return fabric.ns_name(lab, node)


def test_mechanism_is_chosen_and_shown(link: str) -> None:
    """netem where the kernel has it; otherwise the delay line, running only while delay/jitter/loss is set."""
    def alive_roles() -> list[str]:
        return [p["role"] for p in asyncio.run(labctl.status(link))["processes"] if p["alive"]]

    info = labctl.set_link(link, counters=True)
    expected = wan.NETEM if wan.netem_available() else wan.DELAY_LINE
    assert info["mechanism"] == expected
    if expected != wan.DELAY_LINE:
        return
    assert "wan delay-line" not in alive_roles() and info["delay_line"] is None
    info = labctl.set_link(link, delay_us=1000, counters=True)
    assert "wan delay-line" in alive_roles()
    assert info["delay_line"]["delay_us"] == 1000 and "dir0" in info["delay_line"]
    labctl.set_link(link, delay_us=0)
    assert "wan delay-line" not in alive_roles()
    assert probe.ping(ns(link, "esx-a1"), B1_VMK, count=3, interval_s=0.1).received == 3   # bridged again


@pytest.mark.parametrize("rtt_ms", [1, 50, 200])
def test_rtt_matches_the_setting(link: str, rtt_ms: int) -> None:
    """RTT measured with ping on the vMotion and the management networks: within 1 ms of the setting."""
    labctl.set_link(link, delay_us=rtt_ms * 500)
    for target in (B1_VMK, B1_MGMT):
        p = probe.ping(ns(link, "esx-a1"), target, count=8, interval_s=0.05)
        assert p.received == p.sent, p
        assert rtt_ms <= p.min_ms < rtt_ms + 1.0, f"{target}: set {rtt_ms} ms, measured {p}"
        assert p.avg_ms < rtt_ms + 5.0, f"{target}: set {rtt_ms} ms, measured {p}"   # room for a busy CPU


def test_bandwidth_cap_and_buffers_measured_with_tcp(link: str) -> None:
    """A 200 Mbit/s cap at 20 ms RTT: a TCP transfer between two hosts gets 80-105 % of it."""
    cap = 25_000_000
    labctl.set_link(link, delay_us=10_000, change_bandwidth=True, bandwidth_bps=cap)
    r = probe.tcp_transfer(ns(link, "esx-a1"), ns(link, "esx-b1"), B1_VMK, seconds=4)
    assert 0.8 * cap <= r.steady_rate_bps <= 1.05 * cap, f"cap {cap} B/s, measured {r}"


def test_tcp_buffers_follow_the_bandwidth_delay_product(link: str) -> None:
    """auto: twice the BDP in every host's tcp_rmem/tcp_wmem ceiling; kernel: the kernel's own values."""
    def ceilings(host: str) -> tuple[int, int]:
        out = probe.run(["sysctl", "-n", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"], netns=ns(link, host)).stdout
        r, w = out.splitlines()
        return int(r.split()[2]), int(w.split()[2])

    info = labctl.set_link(link, delay_us=50_000, change_bandwidth=True, bandwidth_bps=125_000_000,
                           tcp_buffers="auto")
    want = int(2 * 125_000_000 * 0.1)
    assert all(c == want for c in info["tcp_buffers"]["ceiling_bytes"].values()), info["tcp_buffers"]
    rmem, wmem = wan.kernel_tcp_buffers()
    tuned = (max(rmem[2], want), max(wmem[2], want))    # never below the kernel's own
    assert ceilings("esx-a1") == tuned and ceilings("esx-b2") == tuned
    labctl.set_link(link, tcp_buffers="kernel")
    assert ceilings("esx-a1") == (rmem[2], wmem[2])


@pytest.mark.slow
def test_a_gigabit_at_100ms(link: str) -> None:
    """The delay line's target: >= 1 Gbit/s at 100 ms RTT (jumbo frames, tuned buffers, 4 streams)."""
    labctl.set_link(link, delay_us=50_000, tcp_buffers="auto")
    r = probe.tcp_transfer(ns(link, "esx-a1"), ns(link, "esx-b1"), B1_VMK, seconds=10, streams=4)
    print(f"\n100 ms RTT: {r.steady_rate_bps * 8 / 1e9:.2f} Gbit/s steady, {r.rate_bps * 8 / 1e9:.2f} Gbit/s overall")
    assert r.steady_rate_bps * 8 >= 1e9, r


def test_loss_drops_packets_in_each_direction(link: str) -> None:
    labctl.set_link(link, loss_ppm=100_000)   # 10 % each way: ~19 % of pings lost
    p = probe.ping(ns(link, "esx-a1"), B1_VMK, count=200, interval_s=0.005)
    lost = 1 - p.received / p.sent
    assert 0.08 <= lost <= 0.32, f"{lost:.0%} of pings lost"
    info = labctl.set_link(link, counters=True)
    if info["mechanism"] == wan.DELAY_LINE:
        assert info["delay_line"]["dir0"]["lost"] > 0 and info["delay_line"]["dir1"]["lost"] > 0


def test_jitter_does_not_reorder(link: str) -> None:
    """5 ms of jitter on a 20 ms RTT: the RTTs spread, and 2,000 numbered UDP datagrams sent 0.2 ms
    apart (far closer than the jitter) arrive in the order they were sent."""
    labctl.set_link(link, delay_us=10_000, jitter_us=5_000)
    p = probe.ping(ns(link, "esx-a1"), B1_VMK, count=40, interval_s=0.02)
    assert p.max_ms - p.min_ms > 2.0, p
    rx = socket_in_netns(ns(link, "esx-b1"), type=socket.SOCK_DGRAM)
    tx = socket_in_netns(ns(link, "esx-a1"), type=socket.SOCK_DGRAM)
    got: list[int] = []

    def receive() -> None:
        with contextlib.suppress(TimeoutError):
            while len(got) < 2000:
                got.append(int.from_bytes(rx.recv(16), "big"))

    with rx, tx:
        rx.bind((B1_VMK, 5301))
        rx.settimeout(2.0)
        reader = threading.Thread(target=receive)
        reader.start()
        for i in range(2000):
            tx.sendto(i.to_bytes(4, "big"), (B1_VMK, 5301))
            time.sleep(0.0002)
        reader.join()
    assert len(got) >= 1990, f"{2000 - len(got)} datagrams lost without loss set"
    assert got == sorted(got), f"reordered: first at {next(i for i in range(1, len(got)) if got[i] < got[i - 1])}"


def test_cut_and_restore(link: str) -> None:
    labctl.set_link(link, delay_us=5_000)
    assert not labctl.set_link(link, up=False)["up"]
    p = probe.ping(ns(link, "esx-a1"), B1_VMK, count=3, interval_s=0.2)
    assert p.received == 0, p
    assert labctl.set_link(link, up=True)["up"]
    p = probe.ping(ns(link, "esx-a1"), B1_VMK, count=3, interval_s=0.2)
    assert p.received == 3 and p.min_ms >= 10, p


async def test_migration_across_50ms_rtt(link: str, wvms: LabVms) -> None:
    """esx-a1 -> esx-b1 at 50 ms RTT, the guest writing memory and disk: integrity verified, and the VM's
    own traffic (VXLAN to the observer at site A) then crosses the delay."""
    labctl.set_link(link, delay_us=25_000, tcp_buffers="auto")
    await boot(wvms, "far", "esx-a1", "memory:5MB/s@32M,disk:1MB/s", memory=256 * MiB, disk=128 * MiB)
    m = await wvms.relocate("far", "esx-b1")
    r = report_of(m)
    detail = f"{r.result}: {r.error}; {r.integrity.details}"
    assert m.ok and r.result == "succeeded", detail
    assert [p.name for p in r.phases] == HAPPY
    assert r.integrity.memory == "verified" and r.integrity.disk == "verified", detail
    print(f"\n50 ms RTT: total {r.total_s:.2f} s, downtime reported {r.downtime_ms.reported} ms, "
          f"observed {r.downtime_ms.observed} ms")
    ip = (await wvms.get("far"))["ip"].split("/")[0]
    p = await asyncio.to_thread(probe.ping, ns(link, "obs"), ip, 5, 0.1)
    assert p.received and p.min_ms >= 50, f"VM at site B pinged from site A: {p}"


async def test_cut_during_precopy_rolls_back(link: str, wvms: LabVms) -> None:
    """The link is cut as pre-copy starts (at 50 ms RTT): the VM keeps running on the source only, its disk
    unchanged by the attempt, and once the link is back nothing is left on the destination (``rollback_case``
    checks all of it)."""
    labctl.set_link(link, delay_us=25_000)

    async def cut(held: dict[str, Any]) -> None:
        await asyncio.to_thread(labctl.set_link, link, up=False)

    async def restore() -> None:
        await asyncio.to_thread(labctl.set_link, link, up=True)

    t0 = time.monotonic()
    try:
        m = await rollback_case(wvms, "cutme", "esx-b1", "memory-precopy", "",
                                breakpoints={"memory-precopy:started": cut}, stall_timeout_s=3, heal=restore,
                                dest_settle_s=90)
    finally:
        labctl.set_link(link, up=True)
    print(f"cut in pre-copy: rolled back in {time.monotonic() - t0:.1f} s in all")
    assert report_of(m).error
