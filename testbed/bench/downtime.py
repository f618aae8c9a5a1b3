"""``testbed bench downtime``: the downtime and total time of N moves of one VM, and where the observed downtime
went, as a table.

One lab of its own (2 sites x 2 hosts, its two vCenters, the site link capped), one VM (512 MiB with a 1 GiB
disk by default) moved back and forth between esx-a1 (vc-a) and esx-b1 (vc-b), each move a cross-vCenter
relocate through the VM's vCenter (``testbed.bench.harness``). For each run: the engine's time to the guest
resumed and the whole task's (trust to commit), downtime reported by QEMU and observed by the heartbeat
observer, and where the observed downtime went (from the last heartbeat to the source's pause, the pause to the
end of the final copy, the destination's resume, the first heartbeat after it), bytes on the wire, wire/link
(the physical limit), and the machine's load. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from testbed.bench import harness
from testbed.bench.harness import Log, Measured

MiB = harness.MiB
KEYS = ("to_resume", "data_path", "reported", "observed", "to_pause", "final_copy", "resume", "first_hb",
        "wire_mib", "data_x", "resume_x", "task_s")
HEADINGS = ("start->resumed s", "data path s", "reported ms", "observed ms", "last hb->pause ms",
            "pause->completed ms", "completed->resumed ms", "resumed->first hb ms", "wire MiB",
            "data path / limit", "start->resumed / limit", "task s")
NOTE = ("start->resumed: from the engine's start (its connections to both agents included) to the guest running "
        "on the destination; data path: from the disk sync's start; limit: bytes the source sent on its vMotion "
        "interface / link rate; task: the whole relocate, trust to commit (the vCenter's clock)")


@dataclass(frozen=True)
class Settings:
    lab: str = "bdown"
    runs: int = 10
    workload: str = "memory:20MB/s@128M"
    link_bps: int = 100 * MiB
    link: str = "100MiB/s"                 # as the user wrote it (the table's title)
    downtime_limit_ms: int = 100
    streams: int = 1
    converge: str = "adaptive"
    vm_memory_bytes: int = 512 * MiB
    vm_disk_bytes: int = 1024 * MiB


def row(m: Measured, link_bps: int) -> dict[str, Any] | None:
    """One verified-or-not move's figures; None when the move did not succeed or lacks an instant."""
    r = m.report
    if r is None or m.result != "succeeded":
        return None
    s = r.switchover
    if (s.heartbeat_gap_start_s is None or s.heartbeat_gap_end_s is None or s.source_paused_s is None
            or s.completed_s is None or s.destination_resumed_s is None):
        return None
    disk_start = next((p.start_s for p in r.phases if p.name == "disk-sync"), None)
    if disk_start is None:
        return None
    limit_s = (r.bytes.wire or 0) / link_bps
    task = m.move.task
    return {
        "to_resume": s.destination_resumed_s, "data_path": s.destination_resumed_s - disk_start,
        "reported": r.downtime_ms.reported, "observed": r.downtime_ms.observed,
        "to_pause": (s.source_paused_s - s.heartbeat_gap_start_s) * 1000,
        "final_copy": (s.completed_s - s.source_paused_s) * 1000,
        "resume": (s.destination_resumed_s - s.completed_s) * 1000,
        "first_hb": (s.heartbeat_gap_end_s - s.destination_resumed_s) * 1000,
        "wire_mib": (r.bytes.wire or 0) / MiB,
        "data_x": (s.destination_resumed_s - disk_start) / limit_s if limit_s else 0.0,
        "resume_x": s.destination_resumed_s / limit_s if limit_s else 0.0,
        "task_s": round(task["end_time"] - task["start_time"], 3),
        "rounds": len(r.rounds), "integrity": f"{r.integrity.memory}/{r.integrity.disk}",
        "load": m.load, "loaded": m.loaded}


@dataclass
class Result:
    rows: list[dict[str, Any]]
    reports: list[dict[str, Any]]       # every move's report (or, without one, its task)


async def run(s: Settings, log: Log, into: Result | None = None) -> Result:
    """``runs`` moves of one VM on a lab of its own. ``into`` collects as it goes (kept if it stops early)."""
    out = into or Result(rows=[], reports=[])
    t = harness.topology(s.lab, bandwidth_bps=s.link_bps)
    async with harness.lab_up(t, log) as vms:
        vm = "bench-vm"
        async with harness.booted(vms, vm, "esx-a1", s.vm_memory_bytes, s.vm_disk_bytes, s.workload, log,
                                  timeout_s=60):
            for i in range(s.runs):
                dest = harness.other(await harness.where(vms, vm))
                m = await harness.move(vms, vm, dest, streams=s.streams, downtime_limit_ms=s.downtime_limit_ms,
                                       converge=s.converge)
                out.reports.append(m.report.model_dump(mode="json") if m.report is not None else m.move.task)
                x = row(m, s.link_bps)
                if x is None:
                    log(f"run {i + 1} to {dest}: {m.result}: {m.error or 'an instant of the switchover is missing'}"
                        f", load {m.load}")
                    continue
                out.rows.append(x)
                log(f"run {i + 1} to {dest}: engine {x['to_resume']:.2f} s to resumed, task {x['task_s']:.2f} s, "
                    f"downtime {x['reported']}/{x['observed']} ms, {x['integrity']}, load {m.load}")
                await asyncio.sleep(2)
    return out


def pct(xs: list[float], p: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else None


def cell(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2f}"


def table(s: Settings, rows: list[dict[str, Any]]) -> Table:
    tb = Table("run", *HEADINGS, "rounds", "integrity", "load",
               title=f"{s.runs} cross-vCenter relocates, {s.workload}, link {s.link}, converge {s.converge}, "
                     f"downtime-limit {s.downtime_limit_ms} ms, {s.streams} stream(s)")
    for i, x in enumerate(rows, 1):
        tb.add_row(str(i), *(cell(x[k]) for k in KEYS), str(x["rounds"]), str(x["integrity"]), str(x["load"]))
    if rows:
        for label, p in (("p50", 50), ("max", 100)):
            tb.add_row(label, *(cell(pct([float(x[k]) for x in rows if x[k] is not None], p)) for k in KEYS),
                       "", "", "")
    return tb
