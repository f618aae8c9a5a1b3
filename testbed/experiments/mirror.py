"""Experiment 3: disk mirroring across distance, write-blocking vs background-throttled.

Guest write latency: the guest agent reports no per-write latency, only ``disk_seq`` (the last
4 KiB block written and completed, O_DIRECT|O_DSYNC, one write at a time, paced to the
workload's rate) in every heartbeat. So the experiment measures the guest's achieved write rate
while the mirror runs (disk-sync start to the switchover) against its rate before the migration,
and the mean time per write = elapsed / blocks written in that window. When the writer keeps up
with its pacing that time is the pacing interval (1 / rate); when each write waits for the
destination it grows to the write's service time (about a round trip or more).

Each move is a cross-vCenter relocate through the VM's vCenter; the mirror window is placed on the sampler's
clock with the task's timeline (``harness.engine_start``). The sampler reads the heartbeat observer directly: a
measurement, not management.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from testbed import labctl
from testbed.bench import harness
from testbed.experiments import Outcome
from testbed.experiments.chart import Panel
from testbed.experiments.distance import (
    CONVERGE,
    DOWNTIME_LIMIT_MS,
    Log,
    machine_context,
    measured_rtt,
    metrics,
    private_lab,
    why,
)
from testbed.lab import builder
from testbed.lab import observer as obs

BLOCK = 4096
SLOW_LINK_SYNC_S = 150.0   # on the link slower than the guest's writes: a mirror that has not caught up by then fails


class DiskSeqSampler:
    """Samples the guest's newest heartbeat (its ``disk_seq``) every ``period_s``.

    The observer keeps the whole heartbeat only for the newest one, so the disk counter over
    time has to be sampled while it happens.
    """

    def __init__(self, sock: Any, vm: str, period_s: float = 0.1) -> None:
        self.sock, self.vm, self.period_s = sock, vm, period_s
        self.samples: list[tuple[float, int]] = []     # (heartbeat arrival, disk_seq)
        self.errors: list[str] = []                    # queries the observer did not answer (kept in the row)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                st = await obs.query(self.sock, {"op": "stats", "vm": self.vm, "since_s": time.monotonic() - 1.0})
            except (OSError, TimeoutError) as err:   # one missed sample, said in the row: not a dead sampler
                self.errors.append(f"{time.monotonic():.1f}: {type(err).__name__}: {err}")
                await asyncio.sleep(self.period_s)
                continue
            if st["count"] and st["last"] is not None:
                self.samples.append((float(st["last_s"]), int(st["last"]["disk_seq"])))
            await asyncio.sleep(self.period_s)

    def __enter__(self) -> DiskSeqSampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def at(self, t: float) -> tuple[float, int] | None:
        """The last sample at or before ``t``."""
        before = [x for x in self.samples if x[0] <= t]
        return before[-1] if before else None


def throttle_changes(lab: str, vm: str) -> int:
    """How often the source agent changed the guest's write cap (its log says so for each change)."""
    text = (builder.LabPaths(lab).host_dir("esx-a1") / "hostd.log").read_text(errors="replace")
    return sum(1 for line in text.splitlines() if f"VM {vm}: mirror throttle" in line)


def rate(a: tuple[float, int] | None, b: tuple[float, int] | None) -> tuple[float | None, float | None]:
    """(MB/s written, mean ms per write) between two (time, disk_seq) samples."""
    if a is None or b is None or b[0] <= a[0]:
        return None, None
    blocks = b[1] - a[1]
    secs = b[0] - a[0]
    return round(blocks * BLOCK / secs / 1e6, 3), (round(1000 * secs / blocks, 2) if blocks else None)


async def run_disk_mirror(log: Log, rtts: list[float], bandwidth_bps: int, memory: int, disk: int,
                          workload: str, slow_link_bps: int | None = 5_000_000, slow_memory: int = 128 * 2**20,
                          converge: str = CONVERGE, downtime_limit_ms: int = DOWNTIME_LIMIT_MS) -> Outcome:
    """Each RTT with the three mirror modes on the fast link; then, at 50 ms, a link slower than the guest's
    writes (``slow_link_bps``), where the background mirror's backlog grows and the throttle has to act."""
    out = Outcome(
        name="disk-mirror", title="Disk mirror across distance: write-blocking vs background-throttled "
                                  f"(converge {converge}, downtime limit {downtime_limit_ms} ms)",
        columns=[("link_MBps", "link MB/s"), ("rtt_set_ms", "RTT set"), ("mode", "mirror"), ("result", "result"),
                 ("write_MBps_before", "guest MB/s before"), ("write_MBps_during", "guest MB/s during"),
                 ("ms_per_write_during", "ms/block during"), ("disk_sync_s", "disk sync s"),
                 ("mirror_drain_ms", "drain at switchover ms"), ("throttle_changes", "throttle changes"),
                 ("total_s", "total s"), ("downtime_observed_ms", "downtime obs. ms"), ("load", "load")],
        context={**machine_context(), "converge": converge, "downtime_limit_ms": downtime_limit_ms,
                 "bandwidth_bps": bandwidth_bps, "vm_memory": memory, "vm_disk": disk,
                 "workload": workload, "vmotion_mtu": 9000, "tcp_buffers": "auto",
                 "slow_link_bps": slow_link_bps, "slow_link_vm_memory": slow_memory,
                 "moves": "cross-vCenter relocates through the VM's vCenter"})
    lat = Panel("Guest time per 4 KiB block during the mirror", "RTT (ms)", "ms per block")
    tot = Panel("Total migration time", "RTT (ms)", "seconds")
    async with private_lab(9000, bandwidth_bps, log) as vms:
        lab = vms.lab
        await asyncio.to_thread(labctl.set_link, lab, tcp_buffers="auto")
        sock = labctl.observer_socket(lab)

        async def one(link_bps: int, rtt: float, ping: float, mode: str, granularity: int | None,
                      vm_memory: int) -> None:
            label = mode + ("/4K" if granularity else "")
            vm = f"m-{mode[:2]}{granularity or 0}-{int(rtt)}-{link_bps // 1_000_000}"
            async with harness.booted(vms, vm, "esx-a1", vm_memory, disk, workload, log, settle_s=2.0):
                with DiskSeqSampler(sock, vm) as samples:
                    await asyncio.sleep(3.0)
                    t_before = time.monotonic()
                    base = rate(samples.at(t_before - 2.5), samples.at(t_before))
                    m = await harness.move(vms, vm, "esx-b1", mirror_mode=mode, mirror_granularity=granularity,
                                           converge=converge, downtime_limit_ms=downtime_limit_ms,
                                           disk_sync_timeout_s=SLOW_LINK_SYNC_S if link_bps != bandwidth_bps
                                           else None)
                r = m.report
                row: dict[str, Any] = {"link_MBps": link_bps / 1e6, "rtt_set_ms": rtt, "rtt_ping_ms": round(ping, 2),
                                       "mode": label, "vm_memory": vm_memory, **metrics(m)}
                row["throttle_changes"] = throttle_changes(lab, vm)
                row["sampler_errors"] = samples.errors[:20]
                row["write_MBps_before"], row["ms_per_write_before"] = base
                t0 = harness.engine_start(m.move)
                if r is not None and t0 is not None:
                    sync = next((p for p in r.phases if p.name == "disk-sync"), None)
                    paused = r.switchover.source_paused_s
                    if sync is not None and paused is not None:
                        during = rate(samples.at(t0 + sync.start_s + 0.2), samples.at(t0 + paused))
                        row["write_MBps_during"], row["ms_per_write_during"] = during
                    if r.switchover.mirror_done_s is not None and paused is not None:
                        row["mirror_drain_ms"] = round(1000 * (r.switchover.mirror_done_s - paused), 1)
                out.rows.append(row)
                if link_bps == bandwidth_bps:
                    lat.add(label, rtt, row.get("ms_per_write_during"))
                    tot.add(label, rtt, row.get("total_s"))
                log(f"{link_bps / 1e6:g} MB/s link, {rtt} ms, {label}: {row['result']}, guest "
                    f"{row.get('write_MBps_during')} MB/s ({row.get('ms_per_write_during')} ms/block) during vs "
                    f"{base[0]} before, throttle changes {row['throttle_changes']}, total {row.get('total_s')} s, "
                    f"downtime obs. {row.get('downtime_observed_ms')} ms, load {m.load}" + why(m))

        for rtt in rtts:
            await asyncio.to_thread(labctl.set_link, lab, delay_us=int(rtt * 500))
            ping = await asyncio.to_thread(measured_rtt, lab)
            for mode, granularity in (("write-blocking", None), ("write-blocking", 4096),
                                      ("background-throttled", None)):
                await one(bandwidth_bps, rtt, ping, mode, granularity, memory)
        if slow_link_bps:
            await asyncio.to_thread(labctl.set_link, lab, delay_us=25_000, change_bandwidth=True,
                                    bandwidth_bps=slow_link_bps)
            ping = await asyncio.to_thread(measured_rtt, lab)
            for mode in ("write-blocking", "background-throttled"):
                await one(slow_link_bps, 50, ping, mode, None, slow_memory)
    out.panels = [lat, tot]
    out.context["load_at_end"] = os.getloadavg()
    return out
