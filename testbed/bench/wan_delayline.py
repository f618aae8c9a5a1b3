"""``testbed bench wan``: the site-to-site link against its targets: RTT accuracy from 1 to 200 ms, TCP rate at
100 ms RTT (docs/long-distance.md, "The delay line against its targets").

A lab of its own (two sites, its two vCenters like every lab, no VMs); ping on the vMotion network from
esx-a1 to esx-b1, and TCP transfers between the two host namespaces, one line per measurement with the load.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass

from testbed import labctl
from testbed.bench import harness
from testbed.bench.harness import Log
from testbed.net import fabric, probe

B1 = "198.18.17.11"     # esx-b1's vMotion address (default topology)
RTTS_MS = (0, 1, 2, 5, 10, 50, 100, 150, 200)


@dataclass(frozen=True)
class Settings:
    lab: str = "bwan"
    mtu: int = 9000
    seconds: float = 8.0                   # each TCP transfer
    rtts_ms: Sequence[int] = RTTS_MS


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def measure(lab: str, s: Settings, log: Log) -> None:
    src, dst = fabric.ns_name(lab, "esx-a1"), fabric.ns_name(lab, "esx-b1")
    log(f"lab {lab}, vMotion MTU {s.mtu}, load {_load()}")
    for rtt in s.rtts_ms:
        labctl.set_link(lab, delay_us=rtt * 500)
        p = probe.ping(src, B1, count=20, interval_s=0.02)
        log(f"RTT set {rtt:3d} ms: ping min {p.min_ms:.3f} avg {p.avg_ms:.3f} max {p.max_ms:.3f} "
            f"mdev {p.mdev_ms:.3f} ms ({p.received}/{p.sent}), load {_load()}")
    for cap, label in ((None, "uncapped"), (125_000_000, "1 Gbit/s tbf")):
        labctl.set_link(lab, delay_us=50_000, change_bandwidth=True, bandwidth_bps=cap)
        for buffers in ("kernel", "auto"):
            labctl.set_link(lab, tcp_buffers=buffers)
            for streams in (1, 4):
                r = probe.tcp_transfer(src, dst, B1, seconds=s.seconds, streams=streams)
                log(f"100 ms RTT, {label}, {buffers} buffers, {streams} streams: steady "
                    f"{r.steady_rate_bps * 8 / 1e9:.3f} Gbit/s, whole {r.rate_bps * 8 / 1e9:.3f} Gbit/s, "
                    f"load {_load()}")


async def run(s: Settings, log: Log) -> None:
    async with harness.lab_up(harness.topology(s.lab, mtu=s.mtu), log) as vms:
        await asyncio.to_thread(measure, vms.lab, s, log)
