"""``testbed bench``: this testbed's engine and libvirt's live migration, same lab, VM, workload and link.

One engine-only lab (two sites, the site link capped), one libvirtd on each of the two hosts that
take part (``testbed.lab.libvirtd``). For each workload: a VM (512 MiB, a 1 GiB disk with 256 MiB
of data written before it boots) migrated ``runs`` times back and forth between esx-a1 (site A)
and esx-b1 (site B) by the engine, then the same VM, defined the libvirt way, by libvirt. Only one
VM runs at a time. Each move is verified with the same checks (the guest's heartbeats and memory
pattern, per-MiB disk digests); the same heartbeat observer gives the downtime the guest felt.

The comparison is kept fair (docs/benchmarks.md): the link's cap is the only bandwidth limit for
both (neither engine sets one of its own), both use the same number of TCP streams for memory
(multifd channels / libvirt's parallel connections), both use auto-converge with QEMU's default
initial step and increment and the same downtime limit, and both mirror new disk writes
synchronously (write-blocking / libvirt's synchronous writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from testbed import labctl
from testbed.bench import libvirt_engine as lv
from testbed.errors import InputError, TestbedError
from testbed.guest.workload import parse_workload
from testbed.hosts.agent import AgentClient
from testbed.hosts.netns import NetnsHost
from testbed.lab import builder, libvirtd, quality
from testbed.lab.topology import LinkSpec, Topology, default_topology
from testbed.migration import integrity
from testbed.qemu.spec import VmSpec
from testbed.vms import VmManager

MiB = 1024**2
WORKLOADS = {"idle": "idle", "busy": "memory:20MB/s@128M", "disk": "disk:4MB/s"}
# The disk-writing guest rewrites a 16 MiB block ring (a log), so the data to move stays the same from
# one move to the next instead of growing by what it wrote in between (its ring would reach 256 MiB).
APPEND = {"disk": f"tb.disk_span={16 * 1024**2}"}
HOSTS = ("esx-a1", "esx-b1")
ENGINES = ("ours", "libvirt")
PREFILL = (512 * MiB, 256 * MiB)       # offset, length: written before the VM boots (outside the guest's ring)


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
    total_s: float | None = None
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


def breakdown(qemu: Mapping[str, float], marks: Mapping[str, float | None]) -> dict[str, float]:
    """The observed outage step by step (ms): QEMU's own checkpoints on both sides (its downtime trace) between
    the last heartbeat before the switchover and the first after it; the steps (not the "of which" rows: ours
    only, the destination agent's own instants) add up to the observed outage."""
    at = {**qemu, **{k: v for k, v in marks.items() if v is not None}}
    return {label: round((at[b] - at[a]) * 1000, 1) for label, a, b in STEPS if a in at and b in at}


def _quality(run: Run, w: quality.Watch) -> Run:
    q = w.summary()
    run.quality, run.loaded = q, q["loaded"]
    run.load = (f"{q['load_at_start'][0]:.2f}->{q['load_at_end'][0]:.2f} (max {q['max_load_1m']:.2f}, steal "
                f"{q['steal_pct']:g}%)" + (" LOADED" if q["loaded"] else ""))
    return run


def prefill(path: Path) -> int:
    """Write the benchmark's disk data into the (not yet running) VM's image; returns its allocated data bytes."""
    off, length = PREFILL
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {off} {length}", str(path)], check=True,
                   capture_output=True, text=True)
    return allocated(path)


def allocated(path: Path) -> int:
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return sum(e["length"] for e in json.loads(out) if e.get("data"))


class Bench:
    def __init__(self, s: BenchSettings, log: Callable[[str], None]) -> None:
        self.s, self.log = s, log
        self.runs: list[Run] = []
        self.t: Topology = default_topology(s.lab).model_copy(update={"link": LinkSpec(bandwidth_bps=s.link_bps)})

    async def run(self) -> None:
        for w in self.s.workloads:
            if w not in WORKLOADS:
                raise InputError(f"workload {w!r} is not known", hint=f"use some of: {', '.join(WORKLOADS)}")
        t0 = time.monotonic()
        await labctl.up(self.t, start_agents_now=True)
        try:
            state = builder.load_state(self.s.lab)
            self.hosts = {h: NetnsHost(state, h) for h in HOSTS}
            for h in HOSTS:
                await asyncio.to_thread(libvirtd.start, self.s.lab, h, debug=self.s.libvirt_debug)
            await asyncio.gather(*(asyncio.to_thread(self._warm, h) for h in HOSTS))
            self.log(f"lab {self.s.lab} up with libvirtd on {', '.join(HOSTS)} in {time.monotonic() - t0:.1f} s")
            self.m = VmManager(self.s.lab)
            for w in self.s.workloads:
                for engine in self.s.engines:
                    await (self._ours(w) if engine == "ours" else self._libvirt(w))
        finally:
            if self.s.libvirt_debug:
                self._keep_libvirt_logs()
            await asyncio.to_thread(labctl.down, self.s.lab)

    def _keep_libvirt_logs(self) -> None:
        """Copy each libvirtd's log out of the lab's directory before it is removed."""
        import shutil
        dest = Path.cwd() / f"libvirtd-logs-{self.s.lab}"
        dest.mkdir(exist_ok=True)
        for h in HOSTS:
            src = libvirtd.root(self.s.lab, h) / "var" / "log" / "libvirt"
            if src.exists():
                shutil.copytree(src, dest / h, dirs_exist_ok=True)
        self.log(f"libvirtd logs kept in {dest}")

    def _warm(self, host: str) -> None:
        """Have the host's libvirtd probe QEMU now: a fresh libvirtd does it on first use, which would otherwise
        be inside the first migration (4-5 s here, on the destination, during libvirt's Prepare phase)."""
        h = lv.topology_host(self.t, self.hosts[host].agent_config(), self.s.lab)
        conn = h.connect()
        try:
            conn.getDomainCapabilities(lv.QEMU, "x86_64", "q35", "qemu")
        finally:
            conn.close()

    def _disk_path(self, host: str, file: str) -> Path:
        cfg = self.hosts[host].agent_config()
        return Path(cfg.datastores[0].path) / file

    async def _create(self, name: str, w: str) -> Any:
        rec = await self.m.create(name, HOSTS[0], self.s.memory_bytes, self.s.disk_bytes, workload=WORKLOADS[w],
                                  append=APPEND.get(w), start=False)
        await asyncio.to_thread(prefill, self._disk_path(HOSTS[0], rec.spec.disks[0].file))
        return rec

    async def _disk_data(self, host: str, file: str) -> int:
        return await asyncio.to_thread(allocated, self._disk_path(host, file))

    async def _settle(self, name: str, since: float) -> None:
        await self.m.wait_heartbeat(name, timeout_s=120, since_s=since)
        await asyncio.sleep(3)

    # --- our engine -----------------------------------------------------------------------------------------
    async def _ours(self, w: str) -> None:
        name = f"ours-{w}"
        rec = await self._create(name, w)
        t0 = time.monotonic()
        try:
            async with contextlib.AsyncExitStack() as stack:
                ag = {h: await stack.enter_async_context(self.m.agent(h)) for h in HOSTS}
                await ag[HOSTS[0]].call("vm.start", spec=rec.spec.model_dump())
                await self._settle(name, t0)
                await self._ours_runs(name, w, ag)
        finally:
            await self.m.delete(name)

    async def _ours_runs(self, name: str, w: str, ag: dict[str, AgentClient]) -> None:
        for i in range(self.s.runs):
            src = self.m.get(name).host
            dst = HOSTS[1] if src == HOSTS[0] else HOSTS[0]
            data = await self._disk_data(src, self.m.get(name).spec.disks[0].file)
            with quality.Watch() as watch:
                r = await self.m.migrate(name, dst, streams=self.s.streams, converge="auto-converge",
                                         downtime_limit_ms=self.s.downtime_limit_ms, agents=(ag[src], ag[dst]))
            sw = r.switchover
            ph = {p.name: p for p in r.phases}
            run = Run(engine="ours", workload=w, n=i + 1, direction=f"{src}->{dst}",
                      ok=r.result == "succeeded" and integrity.verdict(r.integrity) == "verified",
                      total_s=sw.destination_resumed_s,
                      disk_s=(ph["disk-sync"].end_s - ph["disk-sync"].start_s) if "disk-sync" in ph else None,
                      memory_s=(sw.destination_resumed_s - ph["memory-precopy"].start_s)
                      if sw.destination_resumed_s is not None and "memory-precopy" in ph else None,
                      rounds=len(r.rounds), wire_bytes=r.bytes.wire, reported_ms=r.downtime_ms.reported,
                      observed_ms=r.downtime_ms.observed, observed_naive_ms=r.downtime_ms.observed_naive,
                      stop_to_resume_ms=r.downtime_ms.stop_to_resume,
                      stall_max_ms=r.stalls_ms.max,
                      memory_integrity=r.integrity.memory, disk_integrity=r.integrity.disk,
                      memory_bytes=r.bytes.memory, disk_data_bytes=data,
                      error=r.error, details=r.integrity.details, raw=r.model_dump(mode="json"),
                      steps=breakdown(r.switchover.qemu, {
                          "resumed_s": r.switchover.destination_resumed_s,
                          "completed_s": r.switchover.completed_s,
                          "nbd_stopped_s": r.switchover.destination_nbd_stopped_s,
                          "bitmaps_s": r.switchover.destination_bitmaps_s,
                          "heartbeat_gap_start_s": r.switchover.heartbeat_gap_start_s,
                          "heartbeat_gap_end_s": r.switchover.heartbeat_gap_end_s}))
            self._record(_quality(run, watch))
            if r.result != "succeeded":
                break
            await asyncio.sleep(2)

    # --- libvirt ----------------------------------------------------------------------------------------------
    async def _libvirt(self, w: str) -> None:
        name = f"lv-{w}"
        rec = await self._create(name, w)
        spec = rec.spec
        lvh = {h: lv.topology_host(self.t, self.hosts[h].agent_config(), self.s.lab) for h in HOSTS}
        settings = lv.Settings(streams=self.s.streams, downtime_limit_ms=self.s.downtime_limit_ms)
        where = HOSTS[0]
        t0 = time.monotonic()
        try:
            cfg = self.hosts[where].agent_config()
            xml = lv.domain_xml(spec, disk_dir=Path(cfg.datastores[0].path), console=lvh[where].console(name),
                                bridges=cfg.port_groups)
            conn = await asyncio.to_thread(lvh[where].connect)
            try:
                await asyncio.to_thread(conn.createXML, xml, 0)
            finally:
                conn.close()
            await self._settle(name, t0)
            async with contextlib.AsyncExitStack() as stack:
                ag = {h: await stack.enter_async_context(self.m.agent(h)) for h in HOSTS}
                where = await self._libvirt_runs(name, w, spec, lvh, ag, settings)
        finally:
            await self._libvirt_cleanup(name, lvh, [d.file for d in spec.disks])

    async def _libvirt_runs(self, name: str, w: str, spec: VmSpec, lvh: dict[str, lv.LibvirtHost],
                        ag: dict[str, AgentClient], settings: lv.Settings) -> str:
        where = HOSTS[0]
        for i in range(self.s.runs):
            dst = HOSTS[1] if where == HOSTS[0] else HOSTS[0]
            data = await self._disk_data(where, spec.disks[0].file)
            with quality.Watch() as watch:
                r = await lv.migrate(spec, lvh[where], lvh[dst], ag[where], ag[dst],
                                     observer=labctl.observer_socket(self.s.lab),
                                     workload=parse_workload(WORKLOADS[w]), settings=settings)
            run = Run(engine="libvirt", workload=w, n=i + 1, direction=f"{where}->{dst}", ok=r.ok,
                      total_s=r.total_s, disk_s=r.disk_s, memory_s=r.memory_s, rounds=r.rounds,
                      wire_bytes=r.wire_bytes, memory_bytes=r.memory_bytes, reported_ms=r.reported_ms,
                      observed_ms=r.observed_ms, observed_naive_ms=r.observed_naive_ms, disk_data_bytes=data,
                      stop_to_resume_ms=round((r.switchover["resumed_s"] - r.qemu_steps["src-downtime-start"])
                                              * 1000, 1) if "src-downtime-start" in r.qemu_steps
                      and "resumed_s" in r.switchover else None,
                      stall_max_ms=r.stalls.max, memory_integrity=r.integrity.memory,
                      disk_integrity=r.integrity.disk, error=r.error,
                      details=r.integrity.details + [f"(the destination's file, read under its running QEMU, "
                                                     f"would say: {v}; {'; '.join(r.file_read_details)})"
                                                     for v in r.file_read_verdicts],
                      raw={**r.stats, "file_read_verdicts": r.file_read_verdicts, "qemu_steps": r.qemu_steps,
                           "switchover": r.switchover},
                      steps=breakdown(r.qemu_steps, r.switchover))
            self._record(_quality(run, watch))
            if r.total_s is None:
                break
            where = dst
            await asyncio.sleep(2)
        return where

    async def _libvirt_cleanup(self, name: str, lvh: dict[str, lv.LibvirtHost], files: list[str]) -> None:
        import libvirt
        for h in HOSTS:
            try:
                conn = await asyncio.to_thread(lvh[h].connect)
            except TestbedError:
                continue
            try:
                dom = conn.lookupByName(name)
                await asyncio.to_thread(dom.destroy)
            except libvirt.libvirtError:
                pass
            finally:
                conn.close()
            async with self.m.agent(h) as ag:
                for f in files:
                    try:
                        await ag.call("disk.delete", datastore=lvh[h].cfg.datastores[0].name, file=f)
                    except TestbedError:
                        pass
        with self.m.registry.edit() as vms:
            vms.pop(name, None)

    def _record(self, run: Run) -> None:
        self.runs.append(run)
        f = _fmt
        self.log(f"{run.workload} {run.engine} run {run.n} ({run.direction}): "
                 f"{'ok' if run.ok else 'NOT OK'}, total {f(run.total_s, 2)} s (disk {f(run.disk_s, 2)}, memory "
                 f"{f(run.memory_s, 2)}), {run.rounds} rounds, wire {f((run.wire_bytes or 0) / MiB, 0)} MiB, "
                 f"downtime {f(run.reported_ms, 0)}/{f(run.observed_ms, 0)} ms, stall {f(run.stall_max_ms, 0)} ms, "
                 f"{run.memory_integrity}/{run.disk_integrity}, load {run.load}"
                 + (f"; {run.error}" if run.error else ""))

    # --- the results ----------------------------------------------------------------------------------------
    def physical_limit_s(self, w: str) -> float | None:
        """(bytes that had to move) / (link rate): the disk's data when the moves started (the median over the
        runs), plus the guest's memory as the least RAM either engine sent for this workload (zero pages cost
        nearly nothing; re-sent dirty pages make it an over-estimate for busy guests, so the limit errs in
        the engines' favour)."""
        runs = [r for r in self.runs if r.workload == w]
        ram = [r.memory_bytes for r in runs if r.memory_bytes]
        disk = [r.disk_data_bytes for r in runs if r.disk_data_bytes is not None]
        if not ram or not disk:
            return None
        return (statistics.median(disk) + min(ram)) / self.s.link_bps

    def to_json(self) -> dict[str, Any]:
        return {"settings": {k: v for k, v in self.s.__dict__.items()},
                "physical_limit_s": {w: self.physical_limit_s(w) for w in self.s.workloads},
                "runs": [r.__dict__ for r in self.runs]}

    def tables(self) -> list[Table]:
        out = []
        for w in self.s.workloads:
            runs = [r for r in self.runs if r.workload == w]
            out += [table(w, runs, self.physical_limit_s(w), self.s), steps_table(w, runs)]
        return out


METRICS = (("total_s", "total (start to resumed), s", 2), ("disk_s", "disk phase, s", 2),
           ("memory_s", "memory phase, s", 2), ("rounds", "memory rounds", 0),
           ("wire_mib", "bytes on the wire, MiB", 0),
           ("reported_ms", "downtime reported, ms", 0),
           ("stop_to_resume_ms", "downtime stop to resume (one clock), ms", 0),
           ("observed_ms", "downtime observed, ms", 0),
           ("observed_naive_ms", "observed, old rule (largest raw gap), ms", 0),
           ("stall_max_ms", "max stall in pre-copy, ms", 0), ("x_limit", "total / physical limit", 2))


def _fmt(v: float | None, nd: int) -> str:
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
             f"{s.downtime_limit_ms} ms; physical limit {_fmt(limit, 2)} s")
    tb = Table("metric", "ours min", "ours p50", "ours max", "libvirt min", "libvirt p50", "libvirt max",
               "ours/libvirt p50", title=title)
    by = {e: [r for r in runs if r.engine == e] for e in ENGINES}
    for key, label, nd in METRICS:
        cells = [label]
        p50 = {}
        for e in ENGINES:
            sm = summary(by[e], key, limit)
            cells += [_fmt(x, nd) for x in sm] if sm else ["-"] * 3
            p50[e] = sm[1] if sm else None
        ratio = p50["ours"] / p50["libvirt"] if p50["ours"] is not None and p50["libvirt"] else None
        cells.append(_fmt(ratio, 2))
        tb.add_row(*cells)
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
        tb.add_row(label, _fmt(p50["ours"], 1), _fmt(p50["libvirt"], 1), _fmt(diff, 1))
    return tb


def markdown(b: Bench) -> str:
    """The tables as Markdown (docs/benchmarks.md)."""
    lines: list[str] = []
    for w in b.s.workloads:
        runs = [r for r in b.runs if r.workload == w]
        limit = b.physical_limit_s(w)
        for tb in (table(w, runs, limit, b.s), steps_table(w, runs)):
            lines += [f"**{tb.title}**", "", "| " + " | ".join(str(c.header) for c in tb.columns) + " |",
                      "|" + "---|" * len(tb.columns)]
            cols = [list(c.cells) for c in tb.columns]
            for i in range(len(cols[0])):
                lines.append("| " + " | ".join(str(c[i]) for c in cols) + " |")
            lines.append("")
    return "\n".join(lines)
