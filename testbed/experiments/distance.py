"""The XvMotion distance experiments: the same migrations at growing RTT (docs/long-distance.md).

Every migration crosses the site-to-site link (esx-a1 <-> esx-b1, ping-pong) as a user moves a VM: a
cross-vCenter relocate through the VM's vCenter (``testbed.bench.harness``). The link's delay and bandwidth
are set with ``labctl.set_link``: on this machine that is the ``tb-wan`` delay line plus the sites' tbf (see
``testbed.net.wan``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import platform
import secrets
import subprocess
from collections.abc import AsyncIterator
from typing import Any

from testbed import labctl
from testbed.bench import harness
from testbed.bench.harness import Log, Measured
from testbed.experiments import Outcome
from testbed.experiments.chart import Panel
from testbed.net import fabric, probe
from testbed.vcenter.labvms import LabVms

MiB = 1024**2
VMK = {"esx-a1": "198.18.16.11", "esx-b1": "198.18.17.11"}


class _Stop(Exception):
    """A series ends early (its note says why)."""


def machine_context() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(), "qemu": qemu,
            "load_at_start": os.getloadavg()}


CONVERGE = "adaptive"          # every experiment states the convergence mode and downtime limit it ran with
DOWNTIME_LIMIT_MS = 100


@contextlib.asynccontextmanager
async def private_lab(mtu: int, bandwidth_bps: int | None, log: Log) -> AsyncIterator[LabVms]:
    """A two-site lab of its own with its two vCenters (jumbo frames on the vMotion network); its VMs through
    the vCenters; always removed."""
    name = "x" + secrets.token_hex(3)
    log(f"lab {name}: up (vMotion MTU {mtu}, link {'uncapped' if not bandwidth_bps else bandwidth_bps * 8 / 1e6}"
        f"{'' if not bandwidth_bps else ' Mbit/s'})")
    async with harness.lab_up(harness.topology(name, bandwidth_bps=bandwidth_bps, mtu=mtu), log) as vms:
        yield vms


def measured_rtt(lab: str) -> float:
    return probe.ping(fabric.ns_name(lab, "esx-a1"), VMK["esx-b1"], count=5, interval_s=0.05).avg_ms


def metrics(m: Measured) -> dict[str, Any]:
    """One migration as a row: times, downtime, bytes and the memory phase's throughput; the task's status and
    length, and the machine's load while it ran. A relocate that never reached the engine has only its error."""
    task = m.move.task
    row: dict[str, Any] = {"result": m.result, "error": m.error, "task": task["status"],
                           "task_s": round(task["end_time"] - task["start_time"], 3) if task.get("end_time") else None,
                           "load": m.load, "loaded": m.loaded}
    r = m.report
    if r is None:
        return row
    span = {p.name: p.end_s - p.start_s for p in r.phases}
    sent = sum(x.transferred_bytes for x in r.rounds)
    secs = sum(x.end_s - x.start_s for x in r.rounds)
    mem_rate = sent / secs if secs > 0 else (r.bytes.memory / span["memory-precopy"]
                                            if span.get("memory-precopy") else None)
    return {**row, "total_s": r.total_s, "downtime_reported_ms": r.downtime_ms.reported,
            "downtime_observed_ms": r.downtime_ms.observed, "path_change_ms": r.downtime_ms.path_change,
            "downtime_observed_naive_ms": r.downtime_ms.observed_naive,
            "stop_to_resume_ms": r.downtime_ms.stop_to_resume, "disk_sync_s": round(span.get("disk-sync", 0.0), 3),
            "precopy_s": round(span.get("memory-precopy", 0.0), 3), "memory_bytes": r.bytes.memory,
            "rounds": len(r.rounds), "max_throttle_pct": max((x.throttle_pct for x in r.rounds), default=0),
            "memory_MBps": round(mem_rate / 1e6, 1) if mem_rate else None,
            "integrity": f"mem {r.integrity.memory}, disk {r.integrity.disk}",
            "switchover": r.switchover.model_dump()}


def why(m: Measured) -> str:
    """What to add to a log line about a move that did not succeed."""
    if m.result == "succeeded":
        return ""
    return f": {m.error}" + (f"; {m.report.integrity.details}" if m.report is not None else "")


async def downtime_vs_rtt(log: Log, rtts: list[float] | None = None, bandwidth_bps: int = 125_000_000,
                          memory: int = 256 * MiB, disk: int = 128 * MiB, streams: int = 1,
                          busy: str = "memory:20MB/s@64M", converge: str = CONVERGE,
                          downtime_limit_ms: int = DOWNTIME_LIMIT_MS, **_: Any) -> Outcome:
    """Experiment 1: downtime reported/observed and total time vs RTT, idle and busy guest."""
    rtts = rtts if rtts is not None else [0, 10, 50, 100, 150]
    out = Outcome(
        name="downtime-vs-rtt",
        title=f"Downtime and total time vs RTT (converge {converge}, downtime limit {downtime_limit_ms} ms)",
        columns=[("workload", "workload"), ("rtt_set_ms", "RTT set"), ("rtt_ping_ms", "RTT ping"),
                 ("result", "result"), ("total_s", "total s"), ("disk_sync_s", "disk s"), ("precopy_s", "pre-copy s"),
                 ("rounds", "rounds"), ("max_throttle_pct", "throttle %"), ("memory_MBps", "mem MB/s"),
                 ("downtime_reported_ms", "downtime rep. ms"), ("stop_to_resume_ms", "stop->resume ms"),
                 ("downtime_observed_ms", "downtime obs. ms"), ("path_change_ms", "hb path delta ms"),
                 ("task_s", "task s"), ("load", "load")],
        context={**machine_context(), "converge": converge, "downtime_limit_ms": downtime_limit_ms,
                 "bandwidth_bps": bandwidth_bps, "vm_memory": memory, "vm_disk": disk,
                 "streams": streams, "tcp_buffers": "auto (2x BDP)", "vmotion_mtu": 9000, "busy_workload": busy,
                 "moves": "cross-vCenter relocates through the VM's vCenter"})
    down = Panel("Downtime vs RTT", "RTT (ms)", "downtime (ms)")
    total = Panel("Total migration time vs RTT", "RTT (ms)", "seconds")
    async with private_lab(9000, bandwidth_bps, log) as vms:
        lab = vms.lab
        await asyncio.to_thread(labctl.set_link, lab, tcp_buffers="auto")
        for wl_name, wl in (("idle", "idle"), ("busy", busy)):
            vm = f"d-{wl_name}"
            async with harness.booted(vms, vm, "esx-a1", memory, disk, wl, log, settle_s=2.0):
                for rtt in rtts:
                    await asyncio.to_thread(labctl.set_link, lab, delay_us=int(rtt * 500))
                    ping = await asyncio.to_thread(measured_rtt, lab)
                    dest = harness.other(await harness.where(vms, vm))
                    m = await harness.move(vms, vm, dest, streams=streams, converge=converge,
                                           downtime_limit_ms=downtime_limit_ms)
                    row = {"workload": wl_name, "rtt_set_ms": rtt, "rtt_ping_ms": round(ping, 2), **metrics(m)}
                    out.rows.append(row)
                    log(f"{wl_name} at {rtt} ms, to {dest}: "
                        f"{row['result']}, total {row.get('total_s')} s, downtime {row.get('downtime_reported_ms')} / "
                        f"{row.get('downtime_observed_ms')} ms, heartbeat path {row.get('path_change_ms')} ms, "
                        f"load {m.load}" + why(m))
                    down.add(f"{wl_name} reported", rtt, row.get("downtime_reported_ms"))
                    down.add(f"{wl_name} observed", rtt, row.get("downtime_observed_ms"))
                    total.add(wl_name, rtt, row.get("total_s"))
                    if m.result != "succeeded":
                        out.notes.append(f"{wl_name}: stopped after {rtt} ms: {m.error}")
                        break
    out.panels = [down, total]
    out.context["load_at_end"] = os.getloadavg()
    return out


async def streams_vs_rtt(log: Log, rtts: list[float] | None = None, streams_list: list[int] | None = None,
                         bandwidth_bps: int = 125_000_000, memory: int = 384 * MiB,
                         workload: str = "memory:2MB/s@256M", tcp_seconds: float = 3.0, converge: str = CONVERGE,
                         downtime_limit_ms: int = DOWNTIME_LIMIT_MS, **_: Any) -> Outcome:
    """Experiment 2: memory-phase throughput vs RTT for 1/2/4/8 channels, kernel vs tuned buffers.

    A raw TCP transfer with the same number of streams over the same path is measured next to each
    migration: it separates what the network allows from what QEMU (under TCG) sends.
    """
    rtts = rtts if rtts is not None else [0, 50, 100, 150]
    streams_list = streams_list or [1, 2, 4, 8]
    out = Outcome(
        name="streams",
        title=f"Streams: memory-phase throughput vs RTT (converge {converge}, downtime limit {downtime_limit_ms} ms)",
        columns=[("buffers", "TCP buffers"), ("rtt_set_ms", "RTT set"), ("streams", "streams"), ("result", "result"),
                 ("memory_MBps", "mem MB/s"), ("link_share_pct", "% of link"), ("tcp_MBps", "raw TCP MB/s"),
                 ("precopy_s", "pre-copy s"), ("total_s", "total s"), ("downtime_observed_ms", "downtime obs. ms"),
                 ("load", "load")],
        context={**machine_context(), "converge": converge, "downtime_limit_ms": downtime_limit_ms,
                 "bandwidth_bps": bandwidth_bps, "vm_memory": memory, "workload": workload,
                 "vmotion_mtu": 9000, "moves": "cross-vCenter relocates through the VM's vCenter"})
    panels = {b: Panel(f"Memory phase, {b} TCP buffers", "RTT (ms)", "MB/s") for b in ("kernel", "auto")}
    async with private_lab(9000, bandwidth_bps, log) as vms:
        lab = vms.lab
        vm = "s-mem"
        async with harness.booted(vms, vm, "esx-a1", memory, None, workload, log, settle_s=2.0):
            with contextlib.suppress(_Stop):
                for buffers in ("kernel", "auto"):
                    await asyncio.to_thread(labctl.set_link, lab, tcp_buffers=buffers)
                    for rtt in rtts:
                        await asyncio.to_thread(labctl.set_link, lab, delay_us=int(rtt * 500))
                        for n in streams_list:
                            src = await harness.where(vms, vm)
                            dest = harness.other(src)
                            tcp = await asyncio.to_thread(probe.tcp_transfer, fabric.ns_name(lab, src),
                                                          fabric.ns_name(lab, dest), VMK[dest], tcp_seconds, n)
                            m = await harness.move(vms, vm, dest, streams=n, converge=converge,
                                                   downtime_limit_ms=downtime_limit_ms)
                            row = {"buffers": buffers, "rtt_set_ms": rtt, "streams": n, **metrics(m),
                                   "tcp_MBps": round(tcp.steady_rate_bps / 1e6, 1)}
                            row["link_share_pct"] = (round(100 * row["memory_MBps"] * 1e6 / bandwidth_bps, 1)
                                                     if row.get("memory_MBps") else None)
                            out.rows.append(row)
                            panels[buffers].add(f"{n} stream{'s' if n > 1 else ''}", rtt, row.get("memory_MBps"))
                            log(f"{buffers} buffers, {rtt} ms, {n} streams: {row['result']}, memory "
                                f"{row.get('memory_MBps')} MB/s ({row['link_share_pct']}% of link), raw TCP "
                                f"{row['tcp_MBps']} MB/s, load {m.load}" + why(m))
                            if m.result != "succeeded":
                                # the VM is where the move left it (its vCenter says where): the series stops
                                out.notes.append(f"stopped after {buffers} buffers, {rtt} ms, {n} streams: {m.error}")
                                raise _Stop
    out.panels = list(panels.values())
    out.context["load_at_end"] = os.getloadavg()
    return out


async def disk_mirror(log: Log, rtts: list[float] | None = None, bandwidth_bps: int = 125_000_000,
                      memory: int = 256 * MiB, disk: int = 256 * MiB, workload: str = "disk:5MB/s",
                      converge: str = CONVERGE, downtime_limit_ms: int = DOWNTIME_LIMIT_MS, **_: Any) -> Outcome:
    """Experiment 3: write-blocking vs background-throttled mirror while the guest writes."""
    from testbed.experiments.mirror import run_disk_mirror
    return await run_disk_mirror(log, rtts if rtts is not None else [0, 50], bandwidth_bps, memory, disk, workload,
                                 converge=converge, downtime_limit_ms=downtime_limit_ms)
