"""``testbed bench``: this testbed's engine and libvirt's live migration, same lab, VM, workload and link.

One lab with its two vCenters (two sites, the site link capped), one libvirtd on each of the two hosts that
take part (``testbed.lab.libvirtd``). For each workload: a VM (512 MiB, a 1 GiB disk with 256 MiB
of data written before it boots) moved ``runs`` times back and forth between esx-a1 (site A, vc-a)
and esx-b1 (site B, vc-b) as a user moves it: a cross-vCenter relocate through the source vCenter's API
(trust, prechecks, admission, the engine, commit); then the same VM, defined the libvirt way, migrated by
libvirt. Ours is reported twice: the whole task (trust to commit) and the engine's part, from its start (the
destination's empty disk, the parameters) to the guest resumed, which is what libvirt's figure covers. Only
one VM runs at a time. Each move is verified with the same checks (the guest's heartbeats and memory
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from testbed import labctl
from testbed.bench import harness
from testbed.bench import libvirt_engine as lv
from testbed.bench.results import WORKLOADS, BenchSettings, MiB, Run, breakdown, fmt, steps_table, table, task_steps
from testbed.errors import InputError, TestbedError
from testbed.guest.workload import parse_workload
from testbed.hosts.agent import AgentClient
from testbed.hosts.netns import NetnsHost
from testbed.lab import builder, libvirtd, quality
from testbed.lab import observer as obs
from testbed.lab.topology import LinkSpec, Topology, default_topology, vm_address
from testbed.migration import integrity
from testbed.migration.report import MigrationReport
from testbed.qemu.spec import VmSpec
from testbed.vcenter import deploy
from testbed.vcenter.client import VcClient
from testbed.vcenter.config import VcenterConfig
from testbed.vcenter.vmspec import build_vm_spec, realize_on_host

# The disk-writing guest rewrites a 16 MiB block ring (a log), so the data to move stays the same from
# one move to the next instead of growing by what it wrote in between (its ring would reach 256 MiB).
APPEND = {"disk": f"tb.disk_span={16 * 1024**2}"}
HOSTS = ("esx-a1", "esx-b1")
VCENTERS = {"esx-a1": "vc-a", "esx-b1": "vc-b"}   # the vCenter of each host (default topology)
PREFILL = (512 * MiB, 256 * MiB)       # offset, length: written before the VM boots (outside the guest's ring)


def _quality(run: Run, w: quality.Watch) -> Run:
    q = w.summary()
    run.quality, run.loaded, run.load = q, q["loaded"], harness.load_text(q)
    return run


def prefill(path: Path) -> int:
    """Write the benchmark's disk data into the (not yet running) VM's image; returns its allocated data bytes."""
    off, length = PREFILL
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {off} {length}", str(path)], check=True,
                   capture_output=True, text=True)
    return allocated(path)


def allocated(path: Path) -> int:
    out = subprocess.run(["qemu-img", "map", "-U", "-f", "qcow2", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
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
        await deploy.up(self.t)          # the lab, its two vCenters, each host added to its vCenter
        try:
            state = builder.load_state(self.s.lab)
            self.hosts = {h: NetnsHost(state, h) for h in HOSTS}
            self.vcs: dict[str, VcenterConfig] = {h: deploy.config_of(self.s.lab, VCENTERS[h]) for h in HOSTS}
            for h in HOSTS:
                await asyncio.to_thread(libvirtd.start, self.s.lab, h, debug=self.s.libvirt_debug)
            await asyncio.gather(*(asyncio.to_thread(self._warm, h) for h in HOSTS))
            self.log(f"lab {self.s.lab} up with vCenters {', '.join(VCENTERS.values())} and libvirtd on "
                     f"{', '.join(HOSTS)} in {time.monotonic() - t0:.1f} s")
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

    async def _disk_data(self, host: str, file: str) -> int:
        return await asyncio.to_thread(allocated, self._disk_path(host, file))

    async def _settle(self, name: str, since: float) -> None:
        first = await obs.first_heartbeat(builder.LabPaths(self.s.lab).observer_socket, name, since, 120)
        if first is None:
            raise TestbedError(f"bench VM {name} sent no heartbeat within 120 s of its start",
                               hint=f"see `testbed --lab {self.s.lab} vm console-log {name}` (the lab is kept "
                                    "only while the bench runs)")
        await asyncio.sleep(3)

    # --- our engine, through the vCenters ------------------------------------------------------------------
    def _vc(self, host: str) -> VcClient:
        return deploy.client(self.s.lab, VCENTERS[host])

    async def _ours(self, w: str) -> None:
        name = f"ours-{w}"
        a = self._vc(HOSTS[0])
        where = HOSTS[0]
        try:
            vm = await a.apost("/api/vcenter/vm", {
                "name": name, "placement": {"host": HOSTS[0]}, "memory": self.s.memory_bytes,
                "disk": self.s.disk_bytes, "workload": WORKLOADS[w], "append": APPEND.get(w), "power_on": False})
            file = vm["disks"][0]["file"]
            await asyncio.to_thread(prefill, self._disk_path(HOSTS[0], file))
            t0 = time.monotonic()
            await a.apost(f"/api/vcenter/vm/{name}/power", params={"action": "start"})
            await self._settle(name, t0)
            where = await self._ours_runs(name, w, file)
        finally:
            await self._ours_cleanup(name, where)
            a.close()

    async def _ours_runs(self, name: str, w: str, file: str) -> str:
        where = HOSTS[0]
        for i in range(self.s.runs):
            dst = HOSTS[1] if where == HOSTS[0] else HOSTS[0]
            data = await self._disk_data(where, file)
            with quality.Watch() as watch:
                task = await self._relocate(name, where, dst)
            r = MigrationReport.model_validate(task["result"]) if task.get("result") else None
            if r is None:
                self._record(_quality(Run(engine="ours", workload=w, n=i + 1, direction=f"{where}->{dst}", ok=False,
                                          error=(task.get("error") or {}).get("message")), watch))
                break
            run = self._our_run(r, w, i + 1, f"{where}->{dst}", data)
            run.task_s = round(task["end_time"] - task["start_time"], 3)
            run.task_steps = task_steps(task.get("timeline", []))
            run.ok = run.ok and task["status"] == "SUCCEEDED"
            self._record(_quality(run, watch))
            if task["status"] != "SUCCEEDED":
                break
            if r.source_kept:     # an unverified move keeps the paused source copy: the next move needs it gone
                with self._vc(where) as c:
                    await c.adelete(f"/api/testbed/source-copies/{name}")
            where = dst
            await asyncio.sleep(2)
        return where

    async def _relocate(self, name: str, src: str, dst: str) -> dict[str, Any]:
        """A cross-vCenter relocate as a user starts it: through the source vCenter's API, the destination vCenter
        named by URL, credentials and pinned thumbprint; the task when it has ended."""
        c = self._vc(src)
        try:
            r = await c.apost(f"/api/vcenter/vm/{name}", {"spec": {
                "placement": {"host": dst}, "destination_vcenter": deploy.destination_vcenter(self.vcs[dst]),
                "options": {"streams": self.s.streams, "converge": "auto-converge",
                            "downtime_limit_ms": self.s.downtime_limit_ms}}}, params={"action": "relocate"})
            return await c.await_task(r["task"], 900)
        finally:
            c.close()

    async def _ours_cleanup(self, name: str, where: str) -> None:
        """Delete the VM through the vCenter that holds it, and any source copy the other one kept."""
        for h in (where, *[x for x in HOSTS if x != where]):
            with self._vc(h) as c:
                for path in (f"/api/vcenter/vm/{name}", f"/api/testbed/source-copies/{name}"):
                    with contextlib.suppress(TestbedError):
                        await c.adelete(path)

    @staticmethod
    def _our_run(r: MigrationReport, w: str, n: int, direction: str, data: int) -> Run:
        sw = r.switchover
        ph = {p.name: p for p in r.phases}
        return Run(engine="ours", workload=w, n=n, direction=direction,
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
                   steps=breakdown(sw.qemu, {
                       "resumed_s": sw.destination_resumed_s, "completed_s": sw.completed_s,
                       "nbd_stopped_s": sw.destination_nbd_stopped_s, "bitmaps_s": sw.destination_bitmaps_s,
                       "heartbeat_gap_start_s": sw.heartbeat_gap_start_s,
                       "heartbeat_gap_end_s": sw.heartbeat_gap_end_s}))

    # --- libvirt ----------------------------------------------------------------------------------------------
    async def _libvirt_vm(self, name: str, w: str) -> VmSpec:
        """The same VM for libvirt: the spec the vCenter would build (an address outside both vCenters' pools),
        its disk created on esx-a1 and prefilled; libvirt defines and runs it, not a vCenter."""
        cfg = self.hosts[HOSTS[0]].agent_config()
        pools = len(VCENTERS) * VcenterConfig.model_fields["vm_ip_pool"].default
        spec, _, _ = build_vm_spec(name, ip=vm_address(pools), mac="52:54:00:be:0c:01",
                                   memory_bytes=self.s.memory_bytes, disk_bytes=self.s.disk_bytes,
                                   workload=WORKLOADS[w], datastore=cfg.datastores[0].name,
                                   port_group=self.t.port_groups[0].name, append=APPEND.get(w))
        agent = await self.hosts[HOSTS[0]].agent()
        try:
            spec = await realize_on_host(agent, spec, start=False)
        finally:
            await agent.close()
        await asyncio.to_thread(prefill, self._disk_path(HOSTS[0], spec.disks[0].file))
        return spec

    @contextlib.asynccontextmanager
    async def _agents(self) -> Any:
        """The lab's own connection to each host's agent (for the heartbeat stream and the disk checks)."""
        async with contextlib.AsyncExitStack() as stack:
            ags: dict[str, AgentClient] = {}
            for h in HOSTS:
                ags[h] = await self.hosts[h].agent()
                stack.push_async_callback(ags[h].close)
            yield ags

    async def _libvirt(self, w: str) -> None:
        name = f"lv-{w}"
        spec = await self._libvirt_vm(name, w)
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
            async with self._agents() as ag:
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
            ag = await self.hosts[h].agent()
            try:
                for f in files:
                    try:
                        await ag.call("disk.delete", datastore=lvh[h].cfg.datastores[0].name, file=f)
                    except TestbedError:
                        pass
            finally:
                await ag.close()

    def _record(self, run: Run) -> None:
        self.runs.append(run)
        f = fmt
        self.log(f"{run.workload} {run.engine} run {run.n} ({run.direction}): "
                 f"{'ok' if run.ok else 'NOT OK'}, total {f(run.total_s, 2)} s (disk {f(run.disk_s, 2)}, memory "
                 f"{f(run.memory_s, 2)}), {run.rounds} rounds, wire {f((run.wire_bytes or 0) / MiB, 0)} MiB, "
                 f"downtime {f(run.reported_ms, 0)}/{f(run.observed_ms, 0)} ms, stall {f(run.stall_max_ms, 0)} ms, "
                 f"{run.memory_integrity}/{run.disk_integrity}, load {run.load}"
                 + (f"; task {f(run.task_s, 2)} s (" + ", ".join(f"{k} {v:.2f}" for k, v in run.task_steps.items())
                    + ")" if run.task_s is not None else "")
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
