"""The source host's side of a live migration (``SourceRole``): disk mirrors to the destination's NBD export,
``migrate``, the telemetry sampler (with SDPS inside it), and the switchover at ``pre-switchover``.
The whole exchange: ``migration``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from testbed.errors import QemuError
from testbed.hostd.migration import caps
from testbed.hostd.mirror_throttle import MirrorThrottle
from testbed.hostd.protocol import EventKind
from testbed.hostd.sdps import SdpsLoop, SdpsSettings
from testbed.hostd.vm import VmProcess

log = logging.getLogger("testbed.hostd.migration.source")


SAMPLE_PERIOD_S = 0.1


class SourceRole:
    def __init__(self, vm: VmProcess, run_dir: Path | None = None) -> None:
        self.vm = vm
        self.run_dir = run_dir or vm.paths.dir.parent
        self.sdps: SdpsLoop | None = None
        self.jobs: list[str] = []
        self.nbd: tuple[str, int] | None = None
        self.timeline: dict[str, float] = {}
        self.hold_switchover = False
        self._continue = asyncio.Event()
        self._job_done: dict[str, asyncio.Event] = {}
        self._job_ready: dict[str, asyncio.Event] = {}
        self._limit_ms: int | None = None          # the downtime limit asked for (applied once the mirrors are READY)
        self._ready_waiter: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._switch: asyncio.Task[None] | None = None
        self.throttle: MirrorThrottle | None = None      # background-throttled mirror only
        vm.event_hooks.append(self._on_event)

    # --- phase 1: disks ---------------------------------------------------------
    async def mirror(self, nbd_host: str, nbd_port: int, mode: str = "write-blocking",
                     granularity: int | None = None) -> list[str]:
        """``mode``: write-blocking (guest writes wait for the destination) or background-throttled
        (guest writes complete locally; ``MirrorThrottle`` caps them while the mirror's backlog grows).
        ``granularity``: the mirror's dirty-tracking unit (QEMU's default: the image's cluster size,
        64 KiB for qcow2); write-blocking mirrors synchronously only the granularity-aligned part
        of a guest write, so smaller writes are copied in the background unless it is 4 KiB."""
        vm = self.vm
        self.nbd = (nbd_host, nbd_port)
        for i, _ in enumerate(vm.spec.disks):
            node, job = f"nbd-disk{i}", f"mirror-disk{i}"
            await vm.execute("blockdev-add", {"driver": "nbd", "node-name": node, "export": f"disk{i}",
                                              "server": {"type": "inet", "host": nbd_host, "port": str(nbd_port)}})
            self._job_done[job] = asyncio.Event()
            self._job_ready[job] = asyncio.Event()
            await vm.execute("blockdev-mirror", {"job-id": job, "device": f"disk{i}", "target": node, "sync": "full",
                                                 "copy-mode": "background" if mode == "background-throttled"
                                                 else "write-blocking",
                                                 **({"granularity": granularity} if granularity else {})})
            self.jobs.append(job)
        if mode == "background-throttled" and self.jobs:
            self.throttle = MirrorThrottle(vm, {f"mirror-disk{i}": f"disk{i}-dev" for i in range(len(self.jobs))})
            self.throttle.start()
        self.timeline["mirror_started_s"] = time.monotonic()
        return self.jobs

    # --- phase 2: memory ---------------------------------------------------------
    async def migrate(self, uri: str, streams: int, auto_converge: bool, max_bandwidth_bps: int | None,
                      downtime_limit_ms: int, hold_switchover: bool = False, max_throttle_pct: int = 90,
                      postcopy: bool = False, sdps: dict[str, Any] | None = None) -> None:
        vm = self.vm
        self.hold_switchover = hold_switchover
        if sdps is not None:
            await self.enable_sdps(sdps)
        # QEMU's throttle as SDPS's fallback needs auto-converge on from the start (a capability)
        fallback = self.sdps is not None and self.sdps.method == "qemu-throttle"
        await vm.execute("migrate-set-capabilities", {"capabilities": caps(
            events=True, multifd=streams > 1, auto_converge=auto_converge or fallback,
            pause_before_switchover=True, postcopy_ram=postcopy)})
        # QEMU's default ceiling of 99% sleeps the vCPU ~990 ms per 10 ms slice: a stall users feel.
        # Memory may start while the mirrors finish (they have copied the disk and flush the destination before
        # they are READY): until then a downtime limit of 0 keeps QEMU from stopping the guest to switch over.
        self._limit_ms = downtime_limit_ms
        early = not self.mirrors_ready()
        params: dict[str, Any] = {"downtime-limit": 0 if early else downtime_limit_ms,
                                  "max-cpu-throttle": max_throttle_pct,
                                  # the link, not QEMU's 128 MiB/s default, is the limit unless asked
                                  "max-bandwidth": max_bandwidth_bps or 100 * 1024**3}
        if streams > 1:
            params["multifd-channels"] = streams
        if fallback and not auto_converge:   # throttle only when SdpsLoop asks for it
            params.update({"throttle-trigger-threshold": 100, "cpu-throttle-initial": 1})
        await vm.execute("migrate-set-parameters", params)
        self.timeline["migrate_s"] = time.monotonic()
        await vm.execute("migrate", {"uri": uri})
        self._sampler = asyncio.create_task(self._sample())
        if early:
            self._ready_waiter = asyncio.create_task(self._limit_when_ready())

    def mirrors_ready(self) -> bool:
        return all(e.is_set() for e in self._job_ready.values())

    async def _wait_mirrors_ready(self, timeout_s: float) -> None:
        """Until every mirror is READY; a mirror that ends first, or none READY in ``timeout_s``: QemuError."""
        for job, ready in self._job_ready.items():
            done = self._job_done[job]
            waits = [asyncio.ensure_future(ready.wait()), asyncio.ensure_future(done.wait())]
            try:
                await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if not ready.is_set():
                raise QemuError(f"disk mirror {job} of VM {self.vm.spec.name} "
                                + ("ended before it was READY" if done.is_set() else
                                   f"was not READY within {timeout_s:.0f} s"))

    async def _limit_when_ready(self) -> None:
        try:
            await self._wait_mirrors_ready(timeout_s=600)
        except QemuError as err:
            log.error("VM %s: %s", self.vm.spec.name, err)
            self.vm.emit(EventKind.MIGRATION_FAILED, {"role": "source", "error": str(err), "at_s": time.monotonic()})
            with contextlib.suppress(QemuError):
                await self.vm.execute("migrate_cancel")
            return
        self.timeline["mirror_ready_s"] = time.monotonic()
        with contextlib.suppress(QemuError):
            await self.vm.execute("migrate-set-parameters", {"downtime-limit": self._limit_ms})

    async def _sample(self) -> None:
        """Telemetry: ``query-migrate`` every 100 ms, relayed as events."""
        while True:
            t = time.monotonic()
            try:
                info = await self.vm.execute("query-migrate")
            except QemuError:
                return
            ram = info.get("ram", {})
            if self.sdps is not None:
                try:
                    decision = await self.sdps.on_sample(info, t)
                except QemuError:
                    return
                if decision is not None:
                    self.vm.emit(EventKind.MIGRATION_SDPS, decision)
            self.vm.emit(EventKind.MIGRATION_PROGRESS, {
                "t_s": t, "status": info.get("status"),
                "transferred_bytes": ram.get("transferred", 0), "remaining_bytes": ram.get("remaining", 0),
                "total_bytes": ram.get("total", 0), "dirty_rate_pps": ram.get("dirty-pages-rate", 0),
                "dirty_sync_count": ram.get("dirty-sync-count", 0), "mbps": ram.get("mbps", 0.0),
                "throttle_pct": info.get("cpu-throttle-percentage", 0),
                "expected_downtime_ms": info.get("expected-downtime"), "downtime_ms": info.get("downtime"),
                "total_time_ms": info.get("total-time"), "setup_time_ms": info.get("setup-time"),
                "multifd_bytes": ram.get("multifd-bytes", 0), "precopy_bytes": ram.get("precopy-bytes", 0),
                "downtime_bytes": ram.get("downtime-bytes", 0),
                "stun_pct": round(self.sdps.stun * 100, 1) if self.sdps else 0.0,
                "sdps_exhausted": bool(self.sdps and self.sdps.exhausted),
                "postcopy_requests": ram.get("postcopy-requests", 0),
            })
            if info.get("status") in ("completed", "failed", "cancelled"):
                return
            if self.sdps is not None and info.get("status") not in ("active", "setup"):
                self.sdps.release()       # the source guest no longer runs here (paused or post-copy)
            await asyncio.sleep(max(0.0, SAMPLE_PERIOD_S - (time.monotonic() - t)))

    # --- phase 3: switchover ---------------------------------------------------------
    def _on_event(self, ev: dict[str, Any]) -> None:
        name, data = ev["event"], ev["data"]
        if name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and data.get("device") in self._job_done:
            self._job_done[data["device"]].set()
        elif name == "BLOCK_JOB_READY" and data.get("device") in self._job_ready:
            self._job_ready[data["device"]].set()
        elif name == "MIGRATION":
            status = data.get("status")
            if status == "pre-switchover" and self._switch is None:
                self.timeline["paused_s"] = ev["monotonic_s"]
                self._switch = asyncio.create_task(self._switchover())
            elif status in ("completed", "failed", "cancelled"):
                self.timeline[f"{status}_s"] = ev["monotonic_s"]

    async def _switchover(self) -> None:
        vm = self.vm
        if self.sdps is not None:
            self.sdps.release()
        try:
            if self.hold_switchover:   # fault injection and experiments: wait for the engine's word
                vm.emit(EventKind.MIGRATION_SWITCHOVER_HELD, dict(self.timeline))
                await self._continue.wait()
            if self.throttle is not None:   # the guest is paused: the mirror drains what is left
                await self.throttle.stop()
            await self._wait_mirrors_ready(timeout_s=60)   # cancelling a mirror before READY would abort it
            for job in self.jobs:
                await vm.execute("block-job-cancel", {"device": job})
            for job in self.jobs:
                await asyncio.wait_for(self._job_done[job].wait(), 30)
            self.timeline["mirror_done_s"] = time.monotonic()
            await vm.execute("migrate-continue", {"state": "pre-switchover"})
            self.timeline["continued_s"] = time.monotonic()
            vm.emit(EventKind.MIGRATION_SWITCHOVER, dict(self.timeline))
        except (TimeoutError, QemuError) as err:
            log.error("VM %s: switchover failed: %s", vm.spec.name, err)
            vm.emit(EventKind.MIGRATION_FAILED, {"role": "source", "error": f"switchover failed: {err}",
                                         "at_s": time.monotonic()})
            with contextlib.suppress(QemuError):
                await vm.execute("migrate_cancel")

    def release_switchover(self) -> None:
        self._continue.set()

    # --- convergence control (the engine's per-round decisions) ------------------------------
    async def enable_sdps(self, settings: dict[str, Any]) -> str:
        """Stun During Page Send for this migration (before ``migrate``: its fallback needs a capability)."""
        if self.sdps is None:
            self.sdps = SdpsLoop(self.vm, SdpsSettings(**settings), self.run_dir)
            await self.sdps.start()
        return self.sdps.method

    async def tune(self, downtime_limit_ms: int | None = None) -> None:
        if downtime_limit_ms is not None:
            self._limit_ms = downtime_limit_ms
            if self.mirrors_ready():   # else applied when they are (_limit_when_ready)
                await self.vm.execute("migrate-set-parameters", {"downtime-limit": downtime_limit_ms})

    async def start_postcopy(self) -> None:
        self.timeline["postcopy_requested_s"] = time.monotonic()
        await self.vm.execute("migrate-start-postcopy")

    async def pause(self) -> None:
        """Post-copy with a dead channel: stop waiting on it (QEMU goes to postcopy-paused)."""
        await self.vm.execute("migrate-pause", oob=True)

    async def resume(self, uri: str) -> None:
        """Post-copy recovery, source side: reconnect to the destination's ``migrate-recover`` listener."""
        await self.vm.execute("migrate", {"uri": uri, "resume": True})
        if self._sampler is None or self._sampler.done():
            self._sampler = asyncio.create_task(self._sample())

    # --- rollback ------------------------------------------------------------------------
    async def cancel(self, resume_completed: bool = False) -> dict[str, Any]:
        """Undo everything on the source: the VM keeps (or goes back to) running here.

        A migration that completed has handed the guest to the destination, which resumes it by itself: the
        guest here is then resumed only with ``resume_completed`` (the caller stopped the destination first);
        otherwise it stays paused and ``completed`` says why (resuming it could make two running copies)."""
        vm = self.vm
        done: list[str] = []
        completed = False
        if self._sampler:
            self._sampler.cancel()
        if self.throttle is not None:
            await self.throttle.stop()
            done.append("guest disk write throttle lifted")
        if self.sdps is not None:
            self.sdps.release()
            done.append("SDPS stun released")
        if self.nbd is not None:
            # A destination that died or a cut link leaves the NBD connection hanging, and QEMU's
            # main loop would block in the drain of blockdev-del until TCP gives up (minutes).
            # Abort our end of the connection first: the NBD client then fails fast.
            killed = await _kill_tcp(*self.nbd)
            if killed:
                done.append(f"NBD connection to {self.nbd[0]}:{self.nbd[1]} aborted")
        with contextlib.suppress(QemuError):
            status = (await vm.execute("query-migrate")).get("status")
            if status not in (None, "completed", "failed", "cancelled"):
                await vm.execute("migrate_cancel")
                done.append("migration cancelled")
                status = (await vm.execute("query-migrate")).get("status")   # it may have completed meanwhile
            completed = status == "completed"
        for i, job in enumerate(self.jobs):
            with contextlib.suppress(QemuError):
                jobs = {j["device"] for j in await vm.execute("query-block-jobs")}
                if job in jobs:
                    await vm.execute("block-job-cancel", {"device": job, "force": True})
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._job_done[job].wait(), 10)
                    done.append(f"mirror {job} cancelled")
            with contextlib.suppress(QemuError):
                await vm.execute("blockdev-del", {"node-name": f"nbd-disk{i}"})
        if vm.alive:
            status = (await vm.execute("query-status"))["status"]
            if completed and not resume_completed:
                done.append(f"the migration had completed: the guest stays paused here (was {status}) until the "
                            "destination is known to be stopped")
            elif status != "running":
                await vm.execute("cont")
                done.append(f"guest resumed on the source (was {status})")
            elif completed:
                done.append("the migration had completed, and the guest already ran again on the source")
        else:
            done.append("the source QEMU is gone")
        self.detach()
        return {"undone": done, "completed": completed}

    def detach(self) -> None:
        if self._sampler:
            self._sampler.cancel()
        if self.sdps is not None:
            self.sdps.release()
        with contextlib.suppress(ValueError):
            self.vm.event_hooks.remove(self._on_event)


async def reachable(host: str, timeout_s: float = 1.0) -> bool:
    """Is ``host`` reachable over TCP from here? (a refused connection to the discard port counts: it answered)"""
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, 9), timeout_s)
        w.close()
        return True
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError):
        return False


async def _kill_tcp(host: str, port: int) -> bool:
    """Abort this namespace's TCP connections to host:port (``ss -K``: needs CONFIG_INET_DIAG_DESTROY)."""
    proc = await asyncio.create_subprocess_exec(
        "ss", "-K", "-tn", "dst", host, "dport", "=", f":{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        log.warning("ss -K to %s:%d failed: %s", host, port, err.decode().strip())
        return False
    return len(out.decode().strip().splitlines()) > 1
