"""What ``testbed bench`` measures and how it prints it: the settings, one run's figures, the switchover
step by step (``breakdown``) and the tables (p50 of each metric per engine, side by side)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

MiB = 1024**2
WORKLOADS = {"idle": "idle", "busy": "memory:20MB/s@128M", "disk": "disk:4MB/s"}
ENGINES = ("ours", "libvirt")


@dataclass
class BenchSettings:
    runs: int = 5
    workloads: tuple[str, ...] = ("idle", "busy", "disk")
    link_bps: int = 100 * MiB
    streams: int = 1
    downtime_limit_ms: int = 30
    memory_bytes: int = 512 * MiB
    disk_bytes: int = 1024 * MiB
    lab: str = "bench"
    engines: tuple[str, ...] = ENGINES
    libvirt_debug: bool = False          # libvirtd logs its QMP traffic with timestamps (where its time goes)


@dataclass
class Run:
    engine: str
    workload: str
    n: int
    direction: str
    ok: bool
    total_s: float | None = None           # the engine: start of the disk copy to the guest resumed
    task_s: float | None = None            # ours: the whole relocate task, trust to commit (the vCenter's clock)
    task_steps: dict[str, float] = field(default_factory=dict)   # ours: where the task's time went (``task_steps``)
    disk_s: float | None = None
    memory_s: float | None = None
    rounds: int | None = None
    wire_bytes: int | None = None
    reported_ms: float | None = None
    observed_ms: float | None = None
    observed_naive_ms: float | None = None   # the largest raw heartbeat gap: the rule before sequence numbers
    stop_to_resume_ms: float | None = None   # QEMU's stop on the source to the guest resumed (libvirt's downtime)
    stall_max_ms: float | None = None
    memory_integrity: str = "unverified"
    disk_integrity: str = "unverified"
    memory_bytes: int | None = None        # RAM bytes the migration sent
    disk_data_bytes: int | None = None     # data allocated on the source disk when the move started
    error: str | None = None
    details: list[str] = field(default_factory=list)
    load: str = ""                          # 1-minute load at start -> end (max during the run)
    loaded: bool = False                    # the load rose above quality.LOADED_PER_CPU per CPU during it
    quality: dict[str, Any] = field(default_factory=dict)   # testbed.lab.quality.Watch.summary()
    steps: dict[str, float] = field(default_factory=dict)   # the switchover step by step, ms (``breakdown``)
    raw: dict[str, Any] = field(default_factory=dict)   # ours: the migration report; libvirt: its job statistics


STEPS = (("last heartbeat -> source stopped", "heartbeat_gap_start_s", "src-downtime-start"),
         ("stopping the vCPUs", "src-downtime-start", "src-vm-stopped"),
         ("pre-switchover (disk mirrors completed) + last RAM", "src-vm-stopped", "src-iterable-saved"),
         ("device state saved and sent", "src-iterable-saved", "src-non-iterable-saved"),
         ("-> loaded on the destination", "src-non-iterable-saved", "dst-precopy-loadvm-completed"),
         ("loaded -> guest resumed (cont)", "dst-precopy-loadvm-completed", "resumed_s"),
         ("  of which: loaded -> its agent saw 'completed'", "dst-precopy-loadvm-completed", "completed_s"),
         ("  of which: 'completed' -> NBD server stopped", "completed_s", "nbd_stopped_s"),
         ("  of which: NBD stopped -> bitmaps on", "nbd_stopped_s", "bitmaps_s"),
         ("  of which: bitmaps on -> cont returned", "bitmaps_s", "resumed_s"),
         ("resumed -> first heartbeat", "resumed_s", "heartbeat_gap_end_s"))


TASK_STEPS = ("trust", "prechecks", "admission", "engine", "registration")


def task_steps(timeline: list[dict[str, Any]]) -> dict[str, float]:
    """A relocate task's time by step, s, from its timeline (when each phase began, the vCenter's clock): trust,
    prechecks and admission (the vCenters), the engine (its own precheck to its end), the registration at the
    destination vCenter (to the task's end)."""
    at: dict[str, float] = {}
    for e in timeline:
        at.setdefault(e["phase"], float(e["at_s"]))
    marks = [("trust", "trust"), ("prechecks", "prechecks"), ("admission", "admission"),
             ("engine", "precheck"), ("registration", "registration"), ("end", "ended")]
    out: dict[str, float] = {}
    for (name, phase), (_, nxt) in zip(marks, marks[1:], strict=False):
        if phase in at and nxt in at:
            out[name] = round(at[nxt] - at[phase], 3)
    return out


def breakdown(qemu: Mapping[str, float], marks: Mapping[str, float | None]) -> dict[str, float]:
    """The observed outage step by step (ms): QEMU's own checkpoints on both sides (its downtime trace) between
    the last heartbeat before the switchover and the first after it; the steps (not the "of which" rows: ours
    only, the destination agent's own instants) add up to the observed outage."""
    at = {**qemu, **{k: v for k, v in marks.items() if v is not None}}
    return {label: round((at[b] - at[a]) * 1000, 1) for label, a, b in STEPS if a in at and b in at}


METRICS = (("total_s", "total (start to resumed), s", 2), ("disk_s", "disk phase, s", 2),
           ("memory_s", "memory phase, s", 2), ("rounds", "memory rounds", 0),
           ("wire_mib", "bytes on the wire, MiB", 0),
           ("reported_ms", "downtime reported, ms", 0),
           ("stop_to_resume_ms", "downtime stop to resume (one clock), ms", 0),
           ("observed_ms", "downtime observed, ms", 0),
           ("observed_naive_ms", "observed, old rule (largest raw gap), ms", 0),
           ("stall_max_ms", "max stall in pre-copy, ms", 0), ("x_limit", "total / physical limit", 2))


TASK_ROW = "ours: the whole relocate task (trust to commit), s"


def fmt(v: float | None, nd: int) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _values(runs: list[Run], key: str, limit: float | None) -> list[float]:
    out: list[float] = []
    for r in runs:
        if key == "wire_mib":
            v: float | None = r.wire_bytes / MiB if r.wire_bytes is not None else None
        elif key == "x_limit":
            v = r.total_s / limit if r.total_s is not None and limit else None
        else:
            v = getattr(r, key)
        if v is not None:
            out.append(float(v))
    return out


def summary(runs: list[Run], key: str, limit: float | None) -> tuple[float, float, float] | None:
    xs = _values(runs, key, limit)
    if not xs:
        return None
    return min(xs), statistics.median(xs), max(xs)


def table(w: str, runs: list[Run], limit: float | None, s: BenchSettings) -> Table:
    title = (f"{w} ({WORKLOADS[w]}): {s.memory_bytes // MiB} MiB VM, {s.disk_bytes // MiB} MiB disk, "
             f"link {s.link_bps / MiB:g} MiB/s, {s.streams} streams, auto-converge, downtime limit "
             f"{s.downtime_limit_ms} ms; physical limit {fmt(limit, 2)} s")
    tb = Table("metric", "ours min", "ours p50", "ours max", "libvirt min", "libvirt p50", "libvirt max",
               "ours/libvirt p50", title=title)
    by = {e: [r for r in runs if r.engine == e] for e in ENGINES}
    for key, label, nd in METRICS:
        cells = [label]
        p50 = {}
        for e in ENGINES:
            sm = summary(by[e], key, limit)
            cells += [fmt(x, nd) for x in sm] if sm else ["-"] * 3
            p50[e] = sm[1] if sm else None
        ratio = p50["ours"] / p50["libvirt"] if p50["ours"] is not None and p50["libvirt"] else None
        cells.append(fmt(ratio, 2))
        tb.add_row(*cells)
    task = summary(by["ours"], "task_s", limit)
    tb.add_row(TASK_ROW, *([fmt(x, 2) for x in task] if task else ["-"] * 3), "", "", "", "")
    ok = {e: f"{sum(r.ok for r in by[e])}/{len(by[e])} verified" for e in ENGINES}
    tb.add_row("integrity (memory and disk)", "", ok["ours"], "", "", ok["libvirt"], "", "")
    loads = {e: [r.quality["max_load_1m"] for r in by[e] if r.quality] for e in ENGINES}
    cells = []
    for e in ENGINES:
        marked = sum(r.loaded for r in by[e])
        cells += ["", f"{max(loads[e]):.2f}" if loads[e] else "-", f"{marked} loaded" if marked else ""]
    tb.add_row("max 1-minute load during a run", *cells, "")
    return tb


def steps_table(w: str, runs: list[Run]) -> Table:
    """Where each engine's observed outage goes, step by step (p50 over the runs, ms)."""
    tb = Table("step (p50, ms)", "ours", "libvirt", "ours - libvirt", title=f"{w}: the switchover step by step")
    by = {e: [r for r in runs if r.engine == e] for e in ENGINES}
    for label, _, _ in STEPS:
        p50 = {e: statistics.median(xs) if (xs := [r.steps[label] for r in by[e] if label in r.steps]) else None
               for e in ENGINES}
        diff = p50["ours"] - p50["libvirt"] if p50["ours"] is not None and p50["libvirt"] is not None else None
        tb.add_row(label, fmt(p50["ours"], 1), fmt(p50["libvirt"], 1), fmt(diff, 1))
    return tb
