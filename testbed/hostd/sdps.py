"""Stun During Page Send, on the source host: stun the guest's vCPUs in millisecond slices.

The engine turns SDPS on for a migrating VM; from then on the source host agent
alone decides, once per pre-copy round, what share of each slice the vCPUs may
run (``SdpsLoop.on_sample``, fed by the agent's own ``query-migrate`` sampler:
no control-plane round trip). It controls the guest's dirty rate, not a CPU
share: it measures what the guest dirtied with the CPU it actually had and
stuns exactly as far as the send rate requires, up to 99 %.

Ways to stun the vCPU threads (``query-cpus-fast``), cgroup v1 groups holding only them:

- ``cfs``: CFS bandwidth (``cpu.cfs_quota_us`` per ``cpu.cfs_period_us``),
  enforced by the kernel (a dead agent leaves a slowed guest, not a stopped one),
  at its tick (4 ms at HZ=250): the vCPU runs about a tick at a time, so one stun
  lasts ``tick x s/(1-s)`` (36 ms at 90 %); the 1 ms minimum quota caps it at 90 % of 10 ms.
- ``freezer``: a thread of the agent freezes and thaws the group on a fixed
  grid (``freezer.state``), precise to the agent's timer: one stun lasts ``s x slice``.
- ``auto`` (default): CFS as far as its stuns stay under ``stall_target_ms``, the freezer beyond.

A guest left 10 % of its vCPU needs ~40 ms of wall time to get one heartbeat out
under TCG; beyond 90 % the heartbeat gaps grow whatever the mechanism (docs/migration.md).

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
CFS_MIN_QUOTA_US = 1000            # the kernel's smallest cpu.cfs_quota_us
FREEZER_MAX_STUN = 0.99            # the freezer always lets the guest run 1 % of each slice


def cfs_max_stun(period_us: int) -> float:
    """The deepest stun CFS bandwidth can give with this period (the quota cannot go below 1 ms)."""
    return 1 - CFS_MIN_QUOTA_US / period_us


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

    def __init__(self, root: Path, name: str, tids: list[int], slice_ms: int, max_frozen_ms: int = 50) -> None:
        self.root = root
        self.dir = root / name
        self.tids = tids
        self.slice_s = slice_ms / 1000
        self.max_frozen_s = max(max_frozen_ms, slice_ms) / 1000
        self.stun = 0.0
        self.dir.mkdir(exist_ok=True)
        for tid in tids:
            (self.dir / "tasks").write_text(str(tid))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._cycle, name=f"sdps-{name}", daemon=True)
        self._thread.start()

    def _cycle(self) -> None:
        """Frozen ``s x slice``, then thawed ``(1 - s) x slice``. On a loaded host this thread wakes late and the
        guest runs longer than planned: the next freeze is stretched so that the share holds
        (frozen = run x s/(1-s)), never beyond ``max_frozen_s`` (the stall target)."""
        fd = os.open(self.dir / "freezer.state", os.O_WRONLY)
        try:
            ran = 0.0                          # how long the guest ran since the last freeze
            while not self._stop.is_set():
                stun = self.stun
                if stun <= 0:
                    ran = 0.0
                    self._stop.wait(self.slice_s)
                    continue
                frozen = min(self.max_frozen_s, max(self.slice_s * stun, ran * stun / (1 - stun)))
                os.write(fd, b"FROZEN")
                time.sleep(frozen)
                os.write(fd, b"THAWED")
                t = time.monotonic()
                time.sleep(self.slice_s * (1 - stun))
                ran = time.monotonic() - t
        finally:
            with contextlib.suppress(OSError):
                os.write(fd, b"THAWED")
            os.close(fd)

    def set(self, stun: float) -> float:
        self.stun = max(0.0, min(stun, FREEZER_MAX_STUN))
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
        quota = max(CFS_MIN_QUOTA_US, int((1 - stun) * self.period_us * len(self.tids)))
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


def _vcpu_cpu_ns(pid: int, tids: list[int]) -> int | None:
    """CPU time the vCPU threads have had (``/proc/PID/task/TID/schedstat``: ns on a CPU), None if unreadable."""
    total = 0
    try:
        for tid in tids:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total


class HybridStun:
    """``auto``: CFS bandwidth while its stalls stay under the target, the freezer beyond.

    CFS checks the quota at the scheduler tick, so the vCPU runs about a tick at a time and one stun lasts
    ``tick x s / (1 - s)``: 36 ms at 90 %, 396 ms at 99 % (HZ=250). The freezer stuns ``s x slice`` at a time
    (9.9 ms at 99 % of 10 ms). CFS is the safer of the two (a dead agent leaves a slowed guest, never a
    frozen one), so it is used as far as the stall target allows: up to ``target / (target + tick)``.
    """

    def __init__(self, cfs: CfsStun, freezer: FreezerStun | None, cfs_limit: float) -> None:
        self.cfs, self.freezer, self.cfs_limit = cfs, freezer, cfs_limit
        self.using = "cfs"

    def set(self, stun: float) -> float:
        if self.freezer is None or stun <= self.cfs_limit:
            if self.freezer is not None:
                self.freezer.set(0.0)
            self.using = "cfs"
            return self.cfs.set(stun)
        self.cfs.set(0.0)
        self.using = "freezer"
        return self.freezer.set(stun)

    def release(self) -> None:
        self.cfs.release()
        if self.freezer is not None:
            self.freezer.release()


@dataclass
class SdpsSettings:
    max_stun_pct: int = 99          # at most this share of each slice stunned
    period_ms: int = 10             # slice length (CFS period, freezer grid)
    target_ratio: float = 0.5       # aim: dirty rate <= this x send rate (remaining halves each round)
    method: str = "auto"            # auto (cfs, then freezer) | cfs | freezer | qemu-throttle
    stall_target_ms: int = 50       # auto: no single stun longer than this
    tick_ms: int = 4                # the kernel's scheduler tick (HZ=250): CFS enforces its quota at it


@dataclass
class SdpsLoop:
    """The agent-local controller of the guest's dirty rate: one decision per pre-copy round.

    Each round (QEMU's ``dirty-sync-count``) it measures the dirty rate the guest achieved (QEMU's
    ``dirty-pages-rate``), the send rate (bytes sent over the round) and the CPU share the vCPU threads
    actually had (their ``schedstat``), so it knows what the guest dirties per CPU-second it gets, whether
    it dirties by the clock (an open-loop service: it uses less CPU than it may, and stunning helps only
    once the CPU it may have falls below what it uses) or per CPU-second (a CPU-bound job). It then lets the
    vCPUs run the share that brings the dirty rate to ``target_ratio`` x the send rate, at once, up to the
    ceiling. When two rounds in a row ran at the ceiling with the stun in force (the vCPUs had no more than
    about the share allowed) and the guest still dirtied as fast as the link sends, the loop says so
    (``exhausted``): stunning cannot make this migration converge, measured, not assumed.
    """

    vm: VmProcess
    settings: SdpsSettings
    run_dir: Path
    method: str = ""
    stun: float = 0.0               # share of each slice stunned now
    exhausted: bool = False         # at the ceiling and still dirtying as fast as the link sends
    decisions: list[dict[str, Any]] = field(default_factory=list)
    _cg: CfsStun | FreezerStun | HybridStun | None = None
    _last: dict[str, Any] | None = None
    _prev_remaining: list[int] = field(default_factory=list)
    _tids: list[int] = field(default_factory=list)
    _pid: int = 0
    _outpaced_rounds: int = 0

    async def start(self) -> None:
        s = self.settings
        if s.method in ("cfs", "freezer", "auto"):
            try:
                cpus = await self.vm.execute("query-cpus-fast")
                tids = [int(c["thread-id"]) for c in cpus]
                assert self.vm.proc is not None
                self._tids, self._pid = tids, self.vm.proc.pid
                name = f"tb-sdps-{self.vm.spec.name}-{self.vm.proc.pid}"
                cfs: CfsStun | None = None
                if s.method in ("cfs", "auto"):
                    root = _find_hierarchy(self.run_dir / "cgroup-cpu", "cpu", "cpu.cfs_quota_us")
                    _remove_stale_groups(root)
                    cfs = CfsStun(root, name, tids, s.period_ms * 1000)
                    self._cg, self.method = cfs, "cfs"
                if s.method in ("freezer", "auto"):
                    freezer: FreezerStun | None = None
                    try:
                        # (the root group of a freezer hierarchy has no freezer.state: it cannot be frozen)
                        froot = _find_hierarchy(self.run_dir / "cgroup-freezer", "freezer", "tasks")
                        sys.setswitchinterval(0.001)   # the stun thread must not wait 5 ms for the GIL
                        _remove_stale_groups(froot)
                        freezer = FreezerStun(froot, name, tids, s.period_ms, s.stall_target_ms)
                    except (OSError, QemuError) as err:
                        if cfs is None:
                            raise
                        log.warning("VM %s: no freezer (%s): CFS alone, stuns beyond %.0f %% last longer than "
                                    "%d ms", self.vm.spec.name, err, self._cfs_limit() * 100, s.stall_target_ms)
                    if cfs is not None:
                        self._cg, self.method = HybridStun(cfs, freezer, self._cfs_limit()), "auto"
                    else:
                        self._cg, self.method = freezer, "freezer"
            except (OSError, QemuError) as err:
                log.warning("VM %s: cgroup stun unavailable (%s); using QEMU's cpu-throttle", self.vm.spec.name, err)
                if self._cg is not None:
                    self._cg.release()
                    self._cg = None
                self.method = "qemu-throttle"
        else:
            self.method = "qemu-throttle"

    def _cfs_limit(self) -> float:
        """The deepest CFS stun whose single stuns stay under the target (and whose quota is >= 1 ms)."""
        s = self.settings
        return min(s.stall_target_ms / (s.stall_target_ms + s.tick_ms), cfs_max_stun(s.period_ms * 1000))

    def _ceiling(self) -> float:
        """The deepest stun the mechanism in use can give (the setting, or less where the mechanism cannot)."""
        s = self.settings
        top = s.max_stun_pct / 100
        if self.method == "qemu-throttle":
            return min(top, QEMU_THROTTLE_CEILING_PCT / 100)
        if self.method == "cfs" or (isinstance(self._cg, HybridStun) and self._cg.freezer is None):
            return min(top, cfs_max_stun(s.period_ms * 1000))
        return min(top, FREEZER_MAX_STUN)

    def _in_force(self) -> tuple[str, float | None]:
        """The mechanism stunning now and how long one stun lasts (ms)."""
        s, st = self.settings, self.stun
        using = self._cg.using if isinstance(self._cg, HybridStun) else self.method
        if st <= 0 or using == "qemu-throttle":
            return using, None
        if using == "freezer":
            return using, round(st * s.period_ms, 1)
        return using, round(max(st * s.period_ms, s.tick_ms * st / (1 - st)), 1)

    def _cpu_ns(self) -> int | None:
        return _vcpu_cpu_ns(self._pid, self._tids) if self._tids else None

    async def on_sample(self, info: dict[str, Any], t_s: float) -> dict[str, Any] | None:
        """Called with every ``query-migrate`` sample; acts when a new round (bitmap sync) began."""
        ram = info.get("ram", {})
        cur = {"t": t_s, "sync": ram.get("dirty-sync-count", 0), "tx": ram.get("transferred", 0),
               "remaining": ram.get("remaining", 0), "dirty_pps": ram.get("dirty-pages-rate", 0)}
        last = self._last
        active = info.get("status") == "active"
        if last is not None and (not active or cur["sync"] == last["sync"]):
            return None
        cur["cpu_ns"] = self._cpu_ns()      # read at round boundaries only (samples come every 100 ms)
        if last is None:
            self._last = cur if active else None
            return None
        self._last = cur
        dt = max(cur["t"] - last["t"], 1e-3)
        send = (cur["tx"] - last["tx"]) / dt
        dirty = cur["dirty_pps"] * PAGE
        s = self.settings
        run_now = 1.0 - self.stun
        used: float | None = None          # the CPU share the vCPUs had over the round
        if cur["cpu_ns"] is not None and last["cpu_ns"] is not None and self._tids:
            used = max(0.0, (cur["cpu_ns"] - last["cpu_ns"]) / 1e9 / dt / len(self._tids))
        self._prev_remaining.append(cur["remaining"])
        shrinking = len(self._prev_remaining) < 2 or self._prev_remaining[-1] < 0.9 * self._prev_remaining[-2]
        goal = s.target_ratio * send
        ceiling = self._ceiling()
        floor = 1 - ceiling
        if dirty <= 0 or send <= 0:
            want_run = run_now
        else:
            had = min(run_now, used) if used is not None else run_now
            want_run = min(1.0, max(had, 1e-3) * goal / dirty)   # dirty scales with the CPU the guest gets
            if not shrinking and dirty >= goal and want_run >= 0.75 * run_now:
                # the dirty set does not shrink although the rates say it should: the guest rewrites its
                # whole working set within a round (QEMU's rate then underestimates it); stun harder
                want_run = run_now * 0.5
            if dirty <= goal:                              # under the goal: never stun harder, ease off
                want_run = min(max(want_run, run_now), run_now * 2)
        want_stun = min(ceiling, max(0.0, 1.0 - want_run))
        if want_stun < 0.02:
            want_stun = 0.0
        at_ceiling = self.stun >= ceiling - 0.005
        # the stun was in force: the vCPUs had no more than about the share allowed (a late freezer thread on a
        # loaded host lets the guest run longer; that is not the guest outpacing the deepest stun)
        honoured = used is None or used <= 2 * (1 - self.stun) + 0.01
        outpaced = at_ceiling and honoured and (dirty >= 0.9 * send or not shrinking) and want_run <= floor + 1e-9
        self._outpaced_rounds = self._outpaced_rounds + 1 if outpaced else 0
        # measured, twice in a row: at the ceiling, with the stun in force, the guest still kept pace with the link
        self.exhausted = self._outpaced_rounds >= 2
        applied = await self._apply(want_stun)
        self.stun = applied
        using, single_ms = self._in_force()
        d = {"t_s": t_s, "sync": cur["sync"], "method": using, "stun_pct": round(applied * 100, 1),
             "dirty_bps": round(dirty), "send_bps": round(send), "remaining_bytes": cur["remaining"],
             "cpu_pct": None if used is None else round(used * 100, 1), "single_stun_ms": single_ms,
             "exhausted": self.exhausted,
             "slice_ms": self.settings.period_ms if using in ("cfs", "freezer") else None}
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
