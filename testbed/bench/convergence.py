"""``testbed bench convergence``: the convergence controllers side by side, every mode x every workload, on a
capped link.

One lab of its own (2 sites x 2 hosts, its two vCenters, the site link capped), one VM per workload (512 MiB
with a 256 MiB disk by default), moved back and forth between esx-a1 (vc-a) and esx-b1 (vc-b) with each mode in
turn, each move a cross-vCenter relocate through the VM's vCenter (``testbed.bench.harness``).
Workloads: idle; 20 MB/s over 128 MiB; 150 MB/s over 256 MiB; ``sweep``: the whole 64 MiB working set rewritten
as fast as the guest's vCPU can (``memory:10GB/s@64M``: the agent's pacing drops what it cannot keep up with);
``open-loop`` and ``cpu-bound``: 60 MB/s over 48 MiB, by the clock and per CPU-second (run them with
``--link 30MiB/s --vm-memory 256M --vm-disk 128M``: ``make bench-convergence``).
Per run: total time, pre-copy rounds, downtime reported by QEMU and observed by the heartbeat observer, the
longest guest stall during pre-copy, the largest SDPS stun / QEMU throttle, whether post-copy was used, the
result, the integrity verdicts and the machine's load. A benchmark, not a test.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from testbed.bench import harness
from testbed.bench.harness import Log, Measured

WORKLOADS = {"idle": "idle", "20": "memory:20MB/s@128M", "150": "memory:150MB/s@256M",
             "sweep": "memory:10GB/s@64M",
             # issue 14's pair: twice what a 30 MiB/s link sends, by the clock and per CPU-second
             "open-loop": "memory:60MB/s@48M", "cpu-bound": "memory:60MB/s@48M,cpu-bound"}
MODES = ("auto-converge", "sdps", "postcopy", "adaptive")
COLUMNS = ("workload", "mode", "result", "total_s", "rounds", "reported_ms", "observed_ms", "stall_max_ms",
           "after_resume_max_ms", "stun_max", "throttle_max", "postcopy", "memory", "disk", "load")


@dataclass(frozen=True)
class Settings:
    lab: str = "bconv"
    runs: int = 1
    link_bps: int = 60 * harness.MiB
    link: str = "60MiB/s"                      # as the user wrote it (the table's title)
    modes: tuple[str, ...] = MODES
    workloads: tuple[str, ...] = ("idle", "20", "150", "sweep")
    downtime_limit_ms: int = 100
    completion_timeout_s: float | None = None
    allow_postcopy: bool = False                # adaptive may fall back to post-copy
    sdps_max_stun_pct: int | None = None        # SDPS's ceiling (the engine's default: 99)
    vm_memory_bytes: int = 512 * harness.MiB
    vm_disk_bytes: int = 256 * harness.MiB


def row(mode: str, wl: str, m: Measured) -> dict[str, Any]:
    """One move as a row; a relocate that never reached the engine has its result, error and load only."""
    out: dict[str, Any] = {"mode": mode, "workload": wl, "result": m.result, "error": m.error, "load": m.load,
                           "loaded": m.loaded, "task": m.move.task["status"]}
    r = m.report
    if r is None:
        return out
    stun = max((d.value or 0.0 for d in r.decisions if d.action == "stun"), default=0.0)
    return {
        **out, "total_s": r.total_s, "rounds": len(r.rounds),
        "reported_ms": r.downtime_ms.reported, "observed_ms": r.downtime_ms.observed,
        "stall_max_ms": r.stalls_ms.max, "stall_total_ms": r.stalls_ms.total,
        "after_resume_max_ms": r.stalls_ms.after_resume_max,
        "throttle_max": max((x.throttle_pct for x in r.rounds), default=0), "stun_max": stun,
        "postcopy": r.postcopy is not None, "memory": r.integrity.memory, "disk": r.integrity.disk,
        "timeout_s": r.completion_timeout_s,
        "decisions": [f"r{d.round} {d.action} {'' if d.value is None else d.value}" for d in r.decisions],
    }


async def run(s: Settings, log: Log, into: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every workload x mode x run on a lab of its own, a row each. ``into`` collects them as they come (the
    caller keeps what was measured if the run stops early)."""
    rows = into if into is not None else []
    options: dict[str, Any] = {"downtime_limit_ms": s.downtime_limit_ms, "completion_timeout_s": s.completion_timeout_s,
                               "allow_postcopy": s.allow_postcopy, "sdps_max_stun_pct": s.sdps_max_stun_pct}
    t = harness.topology(s.lab, bandwidth_bps=s.link_bps)
    async with harness.lab_up(t, log) as vms:
        for wl_key in s.workloads:
            wl = WORKLOADS[wl_key]
            vm = f"conv-{wl_key}"
            try:
                await harness.boot(vms, vm, "esx-a1", s.vm_memory_bytes, s.vm_disk_bytes, wl)
                for mode in s.modes:
                    for i in range(s.runs):
                        dest = harness.other(await harness.where(vms, vm))
                        m = await harness.move(vms, vm, dest, converge=mode, **options)
                        x = row(mode, wl, m)
                        rows.append(x)
                        log(f"{wl} {mode} run {i + 1}: {m.result}"
                            + (f" in {x['total_s']:.1f} s, {x['rounds']} rounds, downtime {x['reported_ms']}/"
                               f"{x['observed_ms']} ms, stall max {x['stall_max_ms']} ms, stun {x['stun_max']}%, "
                               f"throttle {x['throttle_max']}%, post-copy {x['postcopy']}, {x['memory']}/{x['disk']}"
                               if m.report is not None else "")
                            + f", load {m.load}" + (f"; {m.error}" if m.error else ""))
                        if m.result == "failed" and m.report is not None:
                            # the guest runs on the destination, but its move failed a check: start over
                            await harness.remove(vms, vm, log)
                            await harness.boot(vms, vm, "esx-a1", s.vm_memory_bytes, s.vm_disk_bytes, wl)
                        await asyncio.sleep(3)
            finally:
                await harness.remove(vms, vm, log)
    return rows


def fmt(v: Any, nd: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _cells(x: dict[str, Any]) -> list[str]:
    return [fmt(x.get(c), 1 if c == "total_s" else 0) for c in COLUMNS]


def table(s: Settings, rows: list[dict[str, Any]]) -> Table:
    tb = Table(*COLUMNS, title=f"convergence controllers, link {s.link}, downtime limit {s.downtime_limit_ms} ms, "
                               "cross-vCenter relocates")
    for x in rows:
        tb.add_row(*_cells(x))
    return tb


def markdown(rows: list[dict[str, Any]]) -> str:
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cells(x)) + " |" for x in rows]
    return "\n".join(md) + "\n"
