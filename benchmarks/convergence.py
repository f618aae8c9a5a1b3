"""Compare the convergence controllers side by side: every mode x every workload, on a capped link.

    .venv/bin/python benchmarks/convergence.py [--runs 1] [--link 60MiB/s]
        [--modes auto-converge,sdps,postcopy,adaptive] [--workloads idle,20,150,sweep,open-loop,cpu-bound]
        [--vm-memory 512M] [--vm-disk 256M]
        [--allow-postcopy] [--completion-timeout S] [--json FILE] [--markdown FILE]

One lab (2 sites x 2 hosts, site link capped), one 512 MiB VM with a 256 MiB disk per workload,
migrated back and forth between esx-a1 (vc-a) and esx-b1 (vc-b) with each mode in turn.
Workloads: idle; 20 MB/s over 128 MiB; 150 MB/s over 256 MiB; ``sweep``: the whole 64 MiB working
set rewritten as fast as the guest's vCPU can (``memory:10GB/s@64M``: the agent's pacing drops what it
cannot keep up with); ``open-loop`` and ``cpu-bound``: 60 MB/s over 48 MiB, by the clock and per
CPU-second (run them with ``--link 30MiB/s --vm-memory 256M --vm-disk 128M``: ``make bench-convergence``).
Per run: total time, pre-copy rounds, downtime reported by QEMU and observed by the
heartbeat observer, the longest guest stall during pre-copy, the largest SDPS stun / QEMU throttle,
whether post-copy was used, the result and the integrity verdicts. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed import labctl
from testbed.errors import TestbedError
from testbed.lab.topology import LinkSpec, Topology, default_topology
from testbed.migration.convergence import ConvergenceSettings
from testbed.migration.report import MigrationReport
from testbed.units import parse_rate_bytes, parse_size
from testbed.vms import VmManager

MiB = 1024**2


async def lab_up(t: Topology) -> dict[str, float]:
    """The lab without vCenters (the engine alone): the lab operator starts the host agents."""
    return await labctl.up(t, start_agents_now=True)


WORKLOADS = {"idle": "idle", "20": "memory:20MB/s@128M", "150": "memory:150MB/s@256M",
             "sweep": "memory:10GB/s@64M",
             # issue 14's pair: twice what a 30 MiB/s link sends, by the clock and per CPU-second
             "open-loop": "memory:60MB/s@48M", "cpu-bound": "memory:60MB/s@48M,cpu-bound"}


def row(mode: str, wl: str, r: MigrationReport, load: str) -> dict[str, Any]:
    stun = max((d.value or 0.0 for d in r.decisions if d.action == "stun"), default=0.0)
    return {
        "mode": mode, "workload": wl, "result": r.result, "total_s": r.total_s, "rounds": len(r.rounds),
        "reported_ms": r.downtime_ms.reported, "observed_ms": r.downtime_ms.observed,
        "stall_max_ms": r.stalls_ms.max, "stall_total_ms": r.stalls_ms.total,
        "after_resume_max_ms": r.stalls_ms.after_resume_max,
        "throttle_max": max((x.throttle_pct for x in r.rounds), default=0), "stun_max": stun,
        "postcopy": r.postcopy is not None, "memory": r.integrity.memory, "disk": r.integrity.disk,
        "error": r.error, "timeout_s": r.completion_timeout_s, "load": load,
        "decisions": [f"r{d.round} {d.action} {'' if d.value is None else d.value}" for d in r.decisions],
    }


def fmt(v: Any, nd: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--link", default="60MiB/s")
    ap.add_argument("--modes", default="auto-converge,sdps,postcopy,adaptive")
    ap.add_argument("--workloads", default="idle,20,150,sweep")
    ap.add_argument("--downtime-limit", type=int, default=100)
    ap.add_argument("--completion-timeout", type=float, default=None)
    ap.add_argument("--allow-postcopy", action="store_true", help="adaptive may fall back to post-copy")
    ap.add_argument("--sdps-max-stun", type=int, default=None, help="override ConvergenceSettings.sdps_max_stun_pct")
    ap.add_argument("--sdps-slice-ms", type=int, default=None)
    ap.add_argument("--sdps-method", choices=("auto", "freezer", "cfs", "qemu-throttle"), default=None)
    ap.add_argument("--vm-memory", default="512M")
    ap.add_argument("--vm-disk", default="256M")
    ap.add_argument("--lab", default="bconv")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    a = ap.parse_args()
    link = parse_rate_bytes(a.link)
    vm_mem, vm_disk = parse_size(a.vm_memory, what="--vm-memory"), parse_size(a.vm_disk, what="--vm-disk")
    modes = a.modes.split(",")
    over = {k: v for k, v in (("sdps_max_stun_pct", a.sdps_max_stun), ("sdps_slice_ms", a.sdps_slice_ms),
                              ("sdps_method", a.sdps_method)) if v is not None}
    settings = ConvergenceSettings(**over)
    t = default_topology(a.lab).model_copy(update={"link": LinkSpec(bandwidth_bps=link)})
    out = Console()
    rows: list[dict[str, Any]] = []
    await lab_up(t)
    try:
        m = VmManager(a.lab)
        for wl_key in a.workloads.split(","):
            wl = WORKLOADS[wl_key]
            vm = f"conv-{wl_key}"
            t0 = time.monotonic()
            await m.create(vm, "esx-a1", vm_mem, vm_disk, workload=wl)
            await m.wait_heartbeat(vm, timeout_s=90, since_s=t0)
            await asyncio.sleep(3)
            for mode in modes:
                for i in range(a.runs):
                    dest = "esx-b1" if m.get(vm).host == "esx-a1" else "esx-a1"
                    load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
                    r = await m.migrate(vm, dest, converge=mode, downtime_limit_ms=a.downtime_limit,
                                        completion_timeout_s=a.completion_timeout,
                                        allow_postcopy=a.allow_postcopy, convergence=settings)
                    x = row(mode, wl, r, load)
                    rows.append(x)
                    out.print(f"{wl} {mode} run {i + 1}: {r.result} in {r.total_s:.1f} s, {x['rounds']} rounds, "
                              f"downtime {x['reported_ms']}/{x['observed_ms']} ms, stall max {x['stall_max_ms']} ms,"
                              f" stun {x['stun_max']}%, throttle {x['throttle_max']}%, post-copy {x['postcopy']}, "
                              f"{x['memory']}/{x['disk']}, load {load}" + (f"; {r.error}" if r.error else ""))
                    if r.result == "failed":   # a VM left on two hosts: start over with a new one
                        for h in ("esx-a1", "esx-b1"):
                            async with m.agent(h) as ag:
                                for cmd in ("vm.kill", "vm.remove"):
                                    try:
                                        await ag.call(cmd, name=vm)
                                    except TestbedError:
                                        pass
                        with m.registry.edit() as vms:
                            vms.pop(vm, None)
                        t0 = time.monotonic()
                        await m.create(vm, "esx-a1", vm_mem, vm_disk, workload=wl)
                        await m.wait_heartbeat(vm, timeout_s=90, since_s=t0)
                    await asyncio.sleep(3)
            await m.delete(vm)
    finally:
        labctl.down(a.lab)
    cols = ("workload", "mode", "result", "total_s", "rounds", "reported_ms", "observed_ms", "stall_max_ms",
            "after_resume_max_ms", "stun_max", "throttle_max", "postcopy", "memory", "disk", "load")
    table = Table(*cols, title=f"convergence controllers, link {a.link}, downtime limit {a.downtime_limit} ms")
    for x in rows:
        table.add_row(*(fmt(x[c], 1 if c == "total_s" else 0) for c in cols))
    out.print(table)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(x[c], 1 if c == "total_s" else 0) for c in cols) + " |" for x in rows]
    if a.markdown:
        Path(a.markdown).write_text("\n".join(md) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
