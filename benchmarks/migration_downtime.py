"""Measure the XvMotion engine's downtime and total time over N migrations, and print a table.

    .venv/bin/python benchmarks/migration_downtime.py [--runs 10] [--workload memory:20MB/s@128M]
        [--link 100MiB/s] [--downtime-limit 100] [--streams 1] [--json FILE]

One lab (2 sites x 2 hosts, site link capped), one 512 MiB VM with a 1 GiB disk,
migrated back and forth between esx-a1 (vc-a) and esx-b1 (vc-b). For each run:
total time, downtime reported by QEMU and observed by the heartbeat observer, and
where the observed downtime went (from the last heartbeat to the source's pause,
the pause to the end of the final copy, the destination's resume, the first
heartbeat after it), bytes on the wire, and wire/link (the physical limit).
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed import labctl
from testbed.lab.topology import LinkSpec, default_topology
from testbed.units import parse_rate_bytes
from testbed.vms import VmManager

MiB = 1024**2


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--workload", default="memory:20MB/s@128M")
    ap.add_argument("--link", default="100MiB/s")
    ap.add_argument("--downtime-limit", type=int, default=100)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--converge", default="adaptive", help="the convergence mode of every move (in the title)")
    ap.add_argument("--lab", default="bench")
    ap.add_argument("--json")
    a = ap.parse_args()
    link = parse_rate_bytes(a.link)
    t = default_topology(a.lab).model_copy(update={"link": LinkSpec(bandwidth_bps=link)})
    out = Console()
    await labctl.up(t, start_agents_now=True)   # the engine alone: no vCenters
    rows: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    try:
        m = VmManager(a.lab)
        t0 = time.monotonic()
        await m.create("bench-vm", "esx-a1", 512 * MiB, 1024 * MiB, workload=a.workload)
        await m.wait_heartbeat("bench-vm", timeout_s=60, since_s=t0)
        await asyncio.sleep(3)
        for i in range(a.runs):
            dest = "esx-b1" if i % 2 == 0 else "esx-a1"
            r = await m.migrate("bench-vm", dest, streams=a.streams, downtime_limit_ms=a.downtime_limit,
                                converge=a.converge)
            reports.append(r.model_dump(mode="json"))
            s = r.switchover
            if r.result != "succeeded" or s.heartbeat_gap_start_s is None:
                out.print(f"run {i + 1}: {r.result}: {r.error}")
                continue
            assert s.source_paused_s is not None and s.completed_s is not None and s.destination_resumed_s is not None
            assert s.heartbeat_gap_end_s is not None
            disk_start = next(p.start_s for p in r.phases if p.name == "disk-sync")
            limit_s = (r.bytes.wire or 0) / link
            rows.append({
                "to_resume": s.destination_resumed_s, "data_path": s.destination_resumed_s - disk_start,
                "reported": r.downtime_ms.reported, "observed": r.downtime_ms.observed,
                "to_pause": (s.source_paused_s - s.heartbeat_gap_start_s) * 1000,
                "final_copy": (s.completed_s - s.source_paused_s) * 1000,
                "resume": (s.destination_resumed_s - s.completed_s) * 1000,
                "first_hb": (s.heartbeat_gap_end_s - s.destination_resumed_s) * 1000,
                "wire_mib": (r.bytes.wire or 0) / MiB,
                "data_x": (s.destination_resumed_s - disk_start) / limit_s if limit_s else 0.0,
                "resume_x": s.destination_resumed_s / limit_s if limit_s else 0.0,
                "rounds": len(r.rounds), "integrity": f"{r.integrity.memory}/{r.integrity.disk}"})
            await asyncio.sleep(2)
    finally:
        labctl.down(a.lab)
    keys = ("to_resume", "data_path", "reported", "observed", "to_pause", "final_copy", "resume", "first_hb",
            "wire_mib", "data_x", "resume_x")
    table = Table("run", "start->resumed s", "data path s", "reported ms", "observed ms", "last hb->pause ms",
                  "pause->completed ms", "completed->resumed ms", "resumed->first hb ms", "wire MiB",
                  "data path / limit", "start->resumed / limit", "rounds", "integrity",
                  title=f"{a.runs} migrations, {a.workload}, link {a.link}, converge {a.converge}, downtime-limit "
                        f"{a.downtime_limit} ms, {a.streams} stream(s)")
    for i, x in enumerate(rows, 1):
        table.add_row(str(i), *(f"{float(x[k]):.2f}" for k in keys), str(x["rounds"]), str(x["integrity"]))
    if rows:
        for label, p in (("p50", 50), ("max", 100)):
            table.add_row(label, *(f"{pct([float(x[k]) for x in rows], p):.2f}" for k in keys), "", "")
    out.print(table)
    out.print("start->resumed: from the engine's start (SSH to both agents included) to the guest running on the "
              "destination; data path: from the disk sync's start; limit: bytes the source sent on its vMotion "
              "interface / link rate")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "reports": reports}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
