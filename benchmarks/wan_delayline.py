"""The site-to-site link against its targets: RTT accuracy from 1 to 200 ms, TCP rate at 100 ms RTT.

    TESTBED_HOME=/tmp/wanbench .venv/bin/python benchmarks/wan_delayline.py [--mtu 9000] [--seconds 8]

Brings up a private two-site lab (no VMs), measures with ping (vMotion network, esx-a1 -> esx-b1)
and with TCP transfers between the two host namespaces, prints one line per measurement, and
takes the lab down.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets

from testbed import labctl
from testbed.lab.topology import LinkSpec, default_topology
from testbed.net import fabric, probe

B1 = "198.18.17.11"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mtu", type=int, default=9000)
    ap.add_argument("--seconds", type=float, default=8.0)
    a = ap.parse_args()
    lab = "w" + secrets.token_hex(3)
    t = default_topology(lab).model_copy(update={"link": LinkSpec(mtu=a.mtu)})
    asyncio.run(labctl.up(t))   # the network only: no host agents needed
    src, dst = fabric.ns_name(lab, "esx-a1"), fabric.ns_name(lab, "esx-b1")
    try:
        print(f"lab {lab}, vMotion MTU {a.mtu}, load {os.getloadavg()}")
        for rtt in (0, 1, 2, 5, 10, 50, 100, 150, 200):
            labctl.set_link(lab, delay_us=rtt * 500)
            p = probe.ping(src, B1, count=20, interval_s=0.02)
            print(f"RTT set {rtt:3d} ms: ping min {p.min_ms:.3f} avg {p.avg_ms:.3f} max {p.max_ms:.3f} "
                  f"mdev {p.mdev_ms:.3f} ms ({p.received}/{p.sent})", flush=True)
        for cap, label in ((None, "uncapped"), (125_000_000, "1 Gbit/s tbf")):
            labctl.set_link(lab, delay_us=50_000, change_bandwidth=True, bandwidth_bps=cap)
            for buffers in ("kernel", "auto"):
                labctl.set_link(lab, tcp_buffers=buffers)
                for streams in (1, 4):
                    r = probe.tcp_transfer(src, dst, B1, seconds=a.seconds, streams=streams)
                    print(f"100 ms RTT, {label}, {buffers} buffers, {streams} streams: steady "
                          f"{r.steady_rate_bps * 8 / 1e9:.3f} Gbit/s, whole {r.rate_bps * 8 / 1e9:.3f} Gbit/s",
                          flush=True)
        print(f"load {os.getloadavg()}")
    finally:
        labctl.down(lab)


if __name__ == "__main__":
    main()
