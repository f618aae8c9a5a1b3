"""The XvMotion distance experiments: the same migrations at growing RTT (docs/long-distance.md).

Every migration crosses the site-to-site link (esx-a1 <-> esx-b1, ping-pong),
whose delay and bandwidth are set with ``labctl.set_link``: on this machine
that is the ``tb-wan`` delay line plus the sites' tbf (see ``testbed.net.wan``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import platform
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from testbed import labctl
from testbed.experiments import Outcome
from testbed.experiments.chart import Panel
from testbed.lab.topology import LinkSpec, default_topology
from testbed.migration.report import MigrationReport
from testbed.net import fabric, probe
from testbed.vms import VmManager

MiB = 1024**2
VMK = {"esx-a1": "198.18.16.11", "esx-b1": "198.18.17.11"}
Log = Callable[[str], None]


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
async def private_lab(mtu: int, bandwidth_bps: int | None, log: Log) -> AsyncIterator[str]:
    """A two-site lab of its own (jumbo frames on the vMotion network), host agents started; always removed."""
    name = "x" + secrets.token_hex(3)
    t = default_topology(name).model_copy(update={"link": LinkSpec(mtu=mtu, bandwidth_bps=bandwidth_bps)})
    log(f"lab {name}: up (vMotion MTU {mtu}, link {'uncapped' if not bandwidth_bps else bandwidth_bps * 8 / 1e6}"
        f"{'' if not bandwidth_bps else ' Mbit/s'})")
    # The engine alone, without vCenters: the lab operator starts the host agents.
    await labctl.up(t, start_agents_now=True)
    try:
        yield name
    finally:
        await asyncio.to_thread(labctl.down, name)
        log(f"lab {name}: down")


async def boot(m: VmManager, name: str, host: str, memory: int, disk: int | None, workload: str) -> None:
    t0 = time.monotonic()
    await m.create(name, host, memory, disk, workload=workload)
    await m.wait_heartbeat(name, timeout_s=90, since_s=t0)
    await asyncio.sleep(2.0)   # the workload fills its working set


def measured_rtt(lab: str) -> float:
    return probe.ping(fabric.ns_name(lab, "esx-a1"), VMK["esx-b1"], count=5, interval_s=0.05).avg_ms


def metrics(r: MigrationReport) -> dict[str, Any]:
    """One migration as a row: times, downtime, bytes and the memory phase's throughput."""
    span = {p.name: p.end_s - p.start_s for p in r.phases}
    sent = sum(x.transferred_bytes for x in r.rounds)
    secs = sum(x.end_s - x.start_s for x in r.rounds)
    mem_rate = sent / secs if secs > 0 else (r.bytes.memory / span["memory-precopy"]
                                            if span.get("memory-precopy") else None)
    return {"result": r.result, "total_s": r.total_s, "downtime_reported_ms": r.downtime_ms.reported,
            "downtime_observed_ms": r.downtime_ms.observed, "path_change_ms": r.downtime_ms.path_change,
            "downtime_observed_naive_ms": r.downtime_ms.observed_naive,
            "stop_to_resume_ms": r.downtime_ms.stop_to_resume, "disk_sync_s": round(span.get("disk-sync", 0.0), 3),
            "precopy_s": round(span.get("memory-precopy", 0.0), 3), "memory_bytes": r.bytes.memory,
            "rounds": len(r.rounds), "max_throttle_pct": max((x.throttle_pct for x in r.rounds), default=0),
            "memory_MBps": round(mem_rate / 1e6, 1) if mem_rate else None,
            "integrity": f"mem {r.integrity.memory}, disk {r.integrity.disk}",
            "switchover": r.switchover.model_dump(), "error": r.error}


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
                 ("downtime_observed_ms", "downtime obs. ms"), ("path_change_ms", "hb path delta ms")],
        context={**machine_context(), "converge": converge, "downtime_limit_ms": downtime_limit_ms,
                 "bandwidth_bps": bandwidth_bps, "vm_memory": memory, "vm_disk": disk,
                 "streams": streams, "tcp_buffers": "auto (2x BDP)", "vmotion_mtu": 9000, "busy_workload": busy})
    down = Panel("Downtime vs RTT", "RTT (ms)", "downtime (ms)")
    total = Panel("Total migration time vs RTT", "RTT (ms)", "seconds")
    async with private_lab(9000, bandwidth_bps, log) as lab:
        await asyncio.to_thread(labctl.set_link, lab, tcp_buffers="auto")
        m = VmManager(lab)
        for wl_name, wl in (("idle", "idle"), ("busy", busy)):
            vm = f"d-{wl_name}"
            await boot(m, vm, "esx-a1", memory, disk, wl)
            try:
                for rtt in rtts:
                    await asyncio.to_thread(labctl.set_link, lab, delay_us=int(rtt * 500))
                    ping = await asyncio.to_thread(measured_rtt, lab)
                    dest = "esx-b1" if m.get(vm).host == "esx-a1" else "esx-a1"
                    r = await m.migrate(vm, dest, streams=streams, converge=converge,
                                        downtime_limit_ms=downtime_limit_ms)
                    row = {"workload": wl_name, "rtt_set_ms": rtt, "rtt_ping_ms": round(ping, 2), **metrics(r)}
                    out.rows.append(row)
                    log(f"{wl_name} at {rtt} ms, to {dest}: "
                        f"{row['result']}, total {row['total_s']} s, downtime {row['downtime_reported_ms']} / "
                        f"{row['downtime_observed_ms']} ms, heartbeat path {row['path_change_ms']} ms"
                        + (f": {r.error}; {r.integrity.details}" if r.result != "succeeded" else ""))
                    down.add(f"{wl_name} reported", rtt, row["downtime_reported_ms"])
                    down.add(f"{wl_name} observed", rtt, row["downtime_observed_ms"])
                    total.add(wl_name, rtt, row["total_s"])
                    if r.result != "succeeded":
                        break
            finally:
                with contextlib.suppress(Exception):
                    await m.delete(vm)
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
                 ("precopy_s", "pre-copy s"), ("total_s", "total s"), ("downtime_observed_ms", "downtime obs. ms")],
        context={**machine_context(), "converge": converge, "downtime_limit_ms": downtime_limit_ms,
                 "bandwidth_bps": bandwidth_bps, "vm_memory": memory, "workload": workload,
                 "vmotion_mtu": 9000})
    panels = {b: Panel(f"Memory phase, {b} TCP buffers", "RTT (ms)", "MB/s") for b in ("kernel", "auto")}
    async with private_lab(9000, bandwidth_bps, log) as lab:
        m = VmManager(lab)
        vm = "s-mem"
        await boot(m, vm, "esx-a1", memory, None, workload)
        try:
            with contextlib.suppress(_Stop):
                for buffers in ("kernel", "auto"):
                    await asyncio.to_thread(labctl.set_link, lab, tcp_buffers=buffers)
                    for rtt in rtts:
                        await asyncio.to_thread(labctl.set_link, lab, delay_us=int(rtt * 500))
                        for n in streams_list:
                            src = m.get(vm).host
                            dest = "esx-b1" if src == "esx-a1" else "esx-a1"
                            tcp = await asyncio.to_thread(probe.tcp_transfer, fabric.ns_name(lab, src),
                                                          fabric.ns_name(lab, dest), VMK[dest], tcp_seconds, n)
                            r = await m.migrate(vm, dest, streams=n, converge=converge,
                                                downtime_limit_ms=downtime_limit_ms)
                            row = {"buffers": buffers, "rtt_set_ms": rtt, "streams": n, **metrics(r),
                                   "tcp_MBps": round(tcp.steady_rate_bps / 1e6, 1)}
                            row["link_share_pct"] = (round(100 * row["memory_MBps"] * 1e6 / bandwidth_bps, 1)
                                                     if row["memory_MBps"] else None)
                            out.rows.append(row)
                            panels[buffers].add(f"{n} stream{'s' if n > 1 else ''}", rtt, row["memory_MBps"])
                            log(f"{buffers} buffers, {rtt} ms, {n} streams: {row['result']}, memory "
                                f"{row['memory_MBps']} MB/s ({row['link_share_pct']}% of link), raw TCP "
                                f"{row['tcp_MBps']} MB/s" + (f": {r.error}" if r.result != "succeeded" else ""))
                            if r.result != "succeeded":
                                # a failed move leaves the VM where the engine left it: the series cannot go on
                                out.notes.append(f"stopped after {buffers} buffers, {rtt} ms, {n} streams: {r.error}")
                                raise _Stop
        finally:
            with contextlib.suppress(Exception):
                await m.delete(vm)
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
