"""Stun During Page Send, on the source host: stun the guest's vCPUs in millisecond slices.

The engine turns SDPS on for a migrating VM; from then on the source host agent
alone decides, once per pre-copy round, what share of each slice the vCPUs may
run (``SdpsLoop.on_sample``, fed by the agent's own ``query-migrate`` sampler:
no control-plane round trip). Two ways to stun the vCPU threads
(``query-cpus-fast``) in slices, both cgroup v1 groups holding only them:

- ``cfs`` (default): CFS bandwidth (``cpu.cfs_quota_us`` per ``cpu.cfs_period_us``),
  enforced by the kernel (a dead agent leaves a slowed guest, not a stopped one),
  at its tick (4 ms at HZ=250): the vCPU runs about a tick at a time.
- ``freezer``: a thread of the agent freezes and thaws the group on a fixed
  grid (``freezer.state``), precise to the agent's timer.

Either way, at 90 % the guest's heartbeat gaps are ~40 ms (max 50) here, and
grow fast beyond: docs/migration.md has the numbers.

QEMU's own ``cpu-throttle`` at 95 % sleeps the vCPU 190 ms at a time (10 ms x p/(1-p)).

``qemu-throttle`` is the fallback where no cgroup ``cpu`` hierarchy can be
mounted: QEMU's auto-converge, retuned every round (ceiling = the stun the
controller wants, never above 80 %: 40 ms sleeps). KVM's dirty-limit
(``set-vcpu-dirty-limit``) would be the third way; it needs KVM's dirty ring,
which TCG does not have.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import QemuError
from testbed.hostd.vm import VmProcess

log = logging.getLogger("testbed.hostd.sdps")
FREEZER_MOUNT = "freezer"

PAGE = 4096
CGROUP_MOUNT = "cpu"               # the v1 hierarchy's name in /proc/self/mounts
QEMU_THROTTLE_CEILING_PCT = 80     # 10 ms x 0.8/0.2 = 40 ms sleeps, the most we allow from QEMU's throttle


def _remove_stale_groups(root: Path) -> None:
    """Groups left by an agent that died mid-migration: removed once their threads are gone (rmdir refuses
    a group that still has tasks, so a migration in progress elsewhere keeps its group)."""
    for d in root.glob("tb-sdps-*"):
        with contextlib.suppress(OSError):
            if not (d / "tasks").read_text().strip():
                d.rmdir()


def _find_hierarchy(private_dir: Path, controller: str, probe: str) -> Path:
    """Where this process sees the cgroup-v1 hierarchy of ``controller``; mounts it in ``private_dir`` if needed.

    Host agents run in their own mount namespace (``ip netns exec`` remounts /sys), so the
    machine's /sys/fs/cgroup/* is usually not visible: mounting the same hierarchy again
    in the agent's namespace shows the same groups and goes away with the namespace.
    """
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "cgroup" and controller in parts[3].split(","):
            p = Path(parts[1])
            if (p / probe).exists():
                return p
    private_dir.mkdir(parents=True, exist_ok=True)
    if not (private_dir / probe).exists():
        res = subprocess.run(["mount", "-t", "cgroup", "-o", controller, f"tb-{controller}", str(private_dir)],
                             capture_output=True, text=True)
        if res.returncode != 0 or not (private_dir / probe).exists():
            raise QemuError(f"no cgroup-v1 {controller} hierarchy: mount -t cgroup -o {controller} said "
                            f"{res.stderr.strip() or 'nothing'}",
                            hint="SDPS falls back to QEMU's cpu-throttle (longer stalls); on a cgroup-v2-only "
                                 "machine this needs a threaded cgroup (not implemented)")
    return private_dir


class FreezerStun:
    """The vCPU threads in their own freezer group, frozen for ``stun x slice`` of every slice by a thread."""

    def __init__(self, root: Path, name: str, tids: list[int], slice_ms: int) -> None:
        self.root = root
        self.dir = root / name
        self.tids = tids
        self.slice_s = slice_ms / 1000
        self.stun = 0.0
        self.dir.mkdir(exist_ok=True)
        for tid in tids:
            (self.dir / "tasks").write_text(str(tid))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._cycle, name=f"sdps-{name}", daemon=True)
        self._thread.start()

    def _cycle(self) -> None:
        fd = os.open(self.dir / "freezer.state", os.O_WRONLY)
        try:
            nxt = time.monotonic()
            while not self._stop.is_set():
                stun = self.stun
                if stun <= 0:
                    nxt = time.monotonic() + self.slice_s
                    self._stop.wait(self.slice_s)
                    continue
                os.write(fd, b"FROZEN")
                nxt += self.slice_s * stun
                time.sleep(max(0.0, nxt - time.monotonic()))
                os.write(fd, b"THAWED")
                nxt += self.slice_s * (1 - stun)
                now = time.monotonic()
                if nxt < now:          # we were late (a loaded host): never stack up frozen time
                    nxt = now + self.slice_s * (1 - stun)
                time.sleep(max(0.0, nxt - now))
        finally:
            with contextlib.suppress(OSError):
                os.write(fd, b"THAWED")
            os.close(fd)

    def set(self, stun: float) -> float:
        self.stun = max(0.0, min(stun, 0.99))
        return self.stun

    def release(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        with contextlib.suppress(OSError):
            (self.dir / "freezer.state").write_text("THAWED")
        for tid in self.tids:
            with contextlib.suppress(OSError):
                (self.root / "tasks").write_text(str(tid))
        with contextlib.suppress(OSError):
            self.dir.rmdir()


class CfsStun:
    """The vCPU threads of one QEMU in their own CFS-bandwidth group; ``set(stun)`` changes the quota."""

    def __init__(self, root: Path, name: str, tids: list[int], period_us: int) -> None:
        self.root = root
        self.dir = root / name
        self.tids = tids
        self.period_us = period_us
        self.dir.mkdir(exist_ok=True)
        (self.dir / "cpu.cfs_period_us").write_text(str(period_us))
        (self.dir / "cpu.cfs_quota_us").write_text("-1")
        for tid in tids:
            (self.dir / "tasks").write_text(str(tid))

    def set(self, stun: float) -> float:
        """Let the vCPUs run (1 - stun) of each period; returns the stun in force (quota >= 1 ms)."""
        if stun <= 0:
            (self.dir / "cpu.cfs_quota_us").write_text("-1")
            return 0.0
        quota = max(1000, int((1 - stun) * self.period_us * len(self.tids)))
        (self.dir / "cpu.cfs_quota_us").write_text(str(quota))
        return 1 - quota / (self.period_us * len(self.tids))

    def release(self) -> None:
        """Threads back to the root group (unthrottled), the group removed."""
        with contextlib.suppress(OSError):
            (self.dir / "cpu.cfs_quota_us").write_text("-1")
        for tid in self.tids:
            with contextlib.suppress(OSError):   # a thread that exited is already gone
                (self.root / "tasks").write_text(str(tid))
        with contextlib.suppress(OSError):
            self.dir.rmdir()


@dataclass
class SdpsSettings:
    max_stun_pct: int = 90          # at most this share of each slice stunned
    period_ms: int = 10             # slice length (CFS period, freezer grid)
    target_ratio: float = 0.5       # aim: dirty rate <= this x send rate (remaining halves each round)
    method: str = "cfs"             # cfs | freezer | qemu-throttle


@dataclass
class SdpsLoop:
    """The agent-local controller: one decision per pre-copy round (QEMU's ``dirty-sync-count``)."""

    vm: VmProcess
    settings: SdpsSettings
    run_dir: Path
    method: str = ""
    stun: float = 0.0               # share of each slice stunned now
    decisions: list[dict[str, Any]] = field(default_factory=list)
    _cg: CfsStun | FreezerStun | None = None
    _last: dict[str, Any] | None = None
    _prev_remaining: list[int] = field(default_factory=list)

    async def start(self) -> None:
        s = self.settings
        if s.method in ("cfs", "freezer"):
            try:
                cpus = await self.vm.execute("query-cpus-fast")
                tids = [int(c["thread-id"]) for c in cpus]
                assert self.vm.proc is not None
                name = f"tb-sdps-{self.vm.spec.name}-{self.vm.proc.pid}"
                if s.method == "cfs":
                    root = _find_hierarchy(self.run_dir / "cgroup-cpu", "cpu", "cpu.cfs_quota_us")
                    _remove_stale_groups(root)
                    self._cg = CfsStun(root, name, tids, s.period_ms * 1000)
                else:
                    # (the root group of a freezer hierarchy has no freezer.state: it cannot be frozen)
                    root = _find_hierarchy(self.run_dir / "cgroup-freezer", "freezer", "tasks")
                    sys.setswitchinterval(0.001)   # the stun thread must not wait 5 ms for the GIL
                    _remove_stale_groups(root)
                    self._cg = FreezerStun(root, name, tids, s.period_ms)
                self.method = s.method
            except (OSError, QemuError) as err:
                log.warning("VM %s: cgroup stun unavailable (%s); using QEMU's cpu-throttle", self.vm.spec.name, err)
                self.method = "qemu-throttle"
        else:
            self.method = "qemu-throttle"

    async def on_sample(self, info: dict[str, Any], t_s: float) -> dict[str, Any] | None:
        """Called with every ``query-migrate`` sample; acts when a new round (bitmap sync) began."""
        ram = info.get("ram", {})
        cur = {"t": t_s, "sync": ram.get("dirty-sync-count", 0), "tx": ram.get("transferred", 0),
               "remaining": ram.get("remaining", 0), "dirty_pps": ram.get("dirty-pages-rate", 0)}
        last = self._last
        if last is None or info.get("status") != "active":
            self._last = cur if info.get("status") == "active" else last
            return None
        if cur["sync"] == last["sync"]:
            return None
        self._last = cur
        dt = max(cur["t"] - last["t"], 1e-3)
        send = (cur["tx"] - last["tx"]) / dt
        dirty = cur["dirty_pps"] * PAGE
        s = self.settings
        run_now = 1.0 - self.stun
        self._prev_remaining.append(cur["remaining"])
        shrinking = len(self._prev_remaining) < 2 or self._prev_remaining[-1] < 0.9 * self._prev_remaining[-2]
        if dirty <= 0 or send <= 0:
            want_run = run_now
        else:
            free_dirty = dirty / max(run_now, 0.01)        # what the guest would dirty unstunned
            want_run = min(1.0, s.target_ratio * send / free_dirty)
            if not shrinking and want_run >= run_now:
                # the dirty set does not shrink although the rates say it should: the guest rewrites its
                # whole working set within a round (QEMU's rate then underestimates it); stun harder
                want_run = run_now * 0.5
            if shrinking and dirty < s.target_ratio * send and want_run > run_now:
                want_run = min(want_run, run_now * 2)      # ease off gradually
        want_stun = min(s.max_stun_pct / 100, max(0.0, 1.0 - want_run))
        if want_stun < 0.02:
            want_stun = 0.0
        applied = await self._apply(want_stun)
        self.stun = applied
        d = {"t_s": t_s, "sync": cur["sync"], "method": self.method, "stun_pct": round(applied * 100, 1),
             "dirty_bps": round(dirty), "send_bps": round(send), "remaining_bytes": cur["remaining"],
             "slice_ms": self.settings.period_ms if self.method in ("cfs", "freezer") else None}
        self.decisions.append(d)
        return d

    async def _apply(self, stun: float) -> float:
        if self._cg is not None:
            try:
                return self._cg.set(stun)
            except OSError as err:
                log.warning("VM %s: setting the CFS quota failed: %s", self.vm.spec.name, err)
                return self.stun
        pct = min(QEMU_THROTTLE_CEILING_PCT, round(stun * 100))
        with contextlib.suppress(QemuError):
            # auto-converge jumps to min(now + increment, max): increment 100 makes the ceiling the setting
            await self.vm.execute("migrate-set-parameters", {
                "cpu-throttle-initial": max(1, pct), "cpu-throttle-increment": 100,
                "max-cpu-throttle": max(1, pct), "throttle-trigger-threshold": 1 if pct else 100})
        return pct / 100

    def release(self) -> None:
        if self._cg is not None:
            self._cg.release()
            self._cg = None
        self.stun = 0.0
