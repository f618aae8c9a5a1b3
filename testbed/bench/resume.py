"""``testbed bench resume``: what the first resume after a move costs the guest, against a resume of the same
QEMU (issue 14's switchover tail, docs/benchmarks.md).

For each workload: a built-in guest on esx-a1 is paused and resumed N times (``stop``, a short pause, ``cont``),
then moved to esx-b1 (a cross-vCenter relocate), then paused and resumed N times there. Each resume is timed from
``cont`` to the guest's first heartbeat at the observer. A resume of a QEMU that has run the guest is quick; the
first one after a move runs on a new QEMU, whose TCG code cache is empty, so the guest's code is translated again
as it runs. The pause and resume go to the VM's host agent with the lab operator's key (the vCenter has no
suspend), like the lab tests' fault injection; everything else goes through the vCenters.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from testbed import labctl
from testbed.bench import harness
from testbed.bench.harness import Log
from testbed.lab import builder
from testbed.lab import observer as obs
from testbed.vcenter.labvms import LabVms

WORKLOADS = {"idle": "idle", "busy": "memory:20MB/s@128M"}


@dataclass(frozen=True)
class Settings:
    lab: str = "bresume"
    resumes: int = 10                   # stop/cont pairs on each side of the move
    pause_s: float = 0.05               # how long each pause lasts
    workloads: tuple[str, ...] = ("idle", "busy")
    memory_bytes: int = 512 * harness.MiB
    disk_bytes: int = 256 * harness.MiB


@dataclass
class Row:
    workload: str
    before_ms: list[float] = field(default_factory=list)     # cont -> first heartbeat, the source's QEMU
    move_ms: float | None = None                              # the destination's resume -> first heartbeat
    after_ms: list[float] = field(default_factory=list)      # cont -> first heartbeat, the destination's QEMU
    move: dict[str, Any] = field(default_factory=dict)        # reported/observed downtime, verdict, load


async def resumes(vms: LabVms, host: str, name: str, s: Settings) -> list[float]:
    """``s.resumes`` pauses of ``name`` on ``host``: each resume's ``cont`` sent -> first heartbeat, in ms."""
    out: list[float] = []
    sock = builder.LabPaths(vms.lab).observer_socket
    async with await labctl.host(vms.state, host).agent() as agent:
        for _ in range(s.resumes):
            await agent.call("vm.qmp", name=name, command="stop")
            await asyncio.sleep(s.pause_s)
            t0 = time.monotonic()
            await agent.call("vm.qmp", name=name, command="cont")
            first = await obs.first_heartbeat(sock, name, t0, 10)
            if first is None:
                raise RuntimeError(f"VM {name} sent no heartbeat within 10 s of its resume on {host}")
            out.append(round(first * 1000, 1))
            await asyncio.sleep(0.5)
    return out


async def run(s: Settings, log: Log) -> list[Row]:
    rows: list[Row] = []
    src, dst = harness.PAIR
    async with harness.lab_up(harness.topology(s.lab), log) as vms:
        for w in s.workloads:
            row, name = Row(workload=w), f"resume-{w}"
            async with harness.booted(vms, name, src, s.memory_bytes, s.disk_bytes, WORKLOADS[w], log):
                row.before_ms = await resumes(vms, src, name, s)
                m = await harness.move(vms, name, dst)
                r = m.report
                if r is None or not m.move.ok:
                    raise RuntimeError(f"the move of {name} to {dst} failed: {m.error}")
                sw = r.switchover
                if sw.heartbeat_gap_end_s is not None and sw.destination_resumed_s is not None:
                    row.move_ms = round((sw.heartbeat_gap_end_s - sw.destination_resumed_s) * 1000, 1)
                row.move = {"reported_ms": r.downtime_ms.reported, "observed_ms": r.downtime_ms.observed,
                            "verdict": r.result, "load": m.load}
                row.after_ms = await resumes(vms, dst, name, s)
            log(line(row))
            rows.append(row)
    return rows


def _p50(xs: list[float]) -> float:
    return round(statistics.median(xs), 1) if xs else float("nan")


def line(r: Row) -> str:
    return (f"{r.workload}: resume of the same QEMU p50 {_p50(r.before_ms)} ms (max {max(r.before_ms, default=0)}); "
            f"first resume after the move {r.move_ms} ms (downtime reported {r.move.get('reported_ms')} ms, "
            f"observed {r.move.get('observed_ms')} ms, {r.move.get('verdict')}, load {r.move.get('load')}); "
            f"the destination's QEMU resumed again p50 {_p50(r.after_ms)} ms (max {max(r.after_ms, default=0)})")


def markdown(rows: list[Row]) -> str:
    out = ["| workload | cont -> first heartbeat, same QEMU (p50 / max) | first resume after the move "
           "(destination resumed -> first heartbeat) | destination QEMU resumed again (p50 / max) |",
           "|---|---|---|---|"]
    out += [f"| {r.workload} | {_p50(r.before_ms)} / {max(r.before_ms, default=0)} ms | {r.move_ms} ms | "
            f"{_p50(r.after_ms)} / {max(r.after_ms, default=0)} ms |" for r in rows]
    return "\n".join(out) + "\n"
