"""The host agent's side of a live migration: it reacts to its own QEMU's events.

The engine decides; the agents act where timing matters, with no control-plane
round trip on the switchover path:

- ``SourceRole``: mirrors the disks to the destination's NBD export
  (``blockdev-mirror``, ``copy-mode: write-blocking``), starts ``migrate`` (possibly
  once the mirrors have copied the disks but before they are READY: until they are,
  the downtime limit is 0, so QEMU cannot stop the guest to switch over),
  samples ``query-migrate`` for telemetry, and at ``pre-switchover`` cancels the
  (READY) mirrors, which completes a consistent copy, then ``migrate-continue``.
- ``DestinationRole``: QEMU started paused for incoming (``-S -incoming defer``),
  NBD server on the vMotion address with the disks exported writable,
  ``migrate-incoming``; on ``completed`` it stops the NBD server, resumes the
  guest (``cont``) and announces it on the network.

Post-copy (``postcopy-ram``): the engine asks the source for
``migrate-start-postcopy``; the source's ``pre-switchover`` reaction is the
same (mirrors completed first), and the destination resumes at
``postcopy-active`` instead of ``completed`` (with ``-S`` it would stay paused),
then pulls the remaining pages on demand. A broken channel during post-copy
pauses both sides (``postcopy-paused``); ``migrate-pause``/``migrate-recover``/
``migrate resume=true`` reconnect them (``pause``, ``recover``, ``resume``).
SDPS (``testbed.hostd.sdps``) runs inside the source's sampler.

Both report what they did as events (``migration-*``) with CLOCK_MONOTONIC
timestamps, the clock every process of the lab shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from testbed.errors import Conflict, QemuError
from testbed.hostd.mirror_throttle import MirrorThrottle
from testbed.hostd.sdps import SdpsLoop, SdpsSettings
from testbed.hostd.vm import VmProcess

log = logging.getLogger("testbed.hostd.migration")

SAMPLE_PERIOD_S = 0.1


def caps(**flags: bool) -> list[dict[str, Any]]:
    return [{"capability": k.replace("_", "-"), "state": v} for k, v in flags.items()]


def free_port(address: str) -> int:
    """A TCP port free on ``address`` right now (the agent's own namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class DestinationRole:
    def __init__(self, vm: VmProcess, address: str) -> None:
        self.vm = vm
        self.address = address
        self.nbd_port = 0
        self.migration_port = 0
        self.resumed = asyncio.Event()
        self.timeline: dict[str, float] = {}
        self._reaction: asyncio.Task[None] | None = None
        self.aborted = False

    async def prepare(self, streams: int, postcopy: bool = False) -> dict[str, Any]:
        vm = self.vm
        await vm.execute("migrate-set-capabilities", {"capabilities": caps(
            events=True, multifd=streams > 1, late_block_activate=True, postcopy_ram=postcopy)})
        if streams > 1:
            await vm.execute("migrate-set-parameters", {"multifd-channels": streams})
        if vm.spec.disks:
            self.nbd_port = free_port(self.address)
            await vm.execute("nbd-server-start", {"addr": {"type": "inet", "data": {
                "host": self.address, "port": str(self.nbd_port)}}})
        for i, _ in enumerate(vm.spec.disks):
            await vm.execute("block-export-add", {"type": "nbd", "id": f"export-disk{i}",
                                                  "node-name": f"disk{i}", "name": f"disk{i}",
                                                  "writable": True})
        vm.event_hooks.append(self._on_event)
        self.migration_port = free_port(self.address)
        await vm.execute("migrate-incoming", {"uri": f"tcp:{self.address}:{self.migration_port}"})
        return {"nbd": {"host": self.address, "port": self.nbd_port,
                        "exports": [f"disk{i}" for i in range(len(vm.spec.disks))]},
                "uri": f"tcp:{self.address}:{self.migration_port}"}

    def _on_event(self, ev: dict[str, Any]) -> None:
        if ev["event"] != "MIGRATION":
            return
        status = ev["data"].get("status")
        if self.aborted:      # abort() decided: this guest never runs here
            return
        if status == "completed" and self._reaction is None:
            self.timeline["completed_s"] = ev["monotonic_s"]
            self._reaction = asyncio.create_task(self._resume())
        elif status == "postcopy-active" and self._reaction is None:
            # the guest's device state follows; with -S QEMU would leave it paused: resume it ourselves
            self.timeline["postcopy_s"] = ev["monotonic_s"]
            self._reaction = asyncio.create_task(self._resume(postcopy=True))
        elif status == "completed":     # the end of a post-copy: every page is here
            self.timeline["completed_s"] = ev["monotonic_s"]
            self.vm.emit("migration-completed", {"role": "destination", "at_s": ev["monotonic_s"]})
        elif status in ("postcopy-paused", "postcopy-recover"):
            self.vm.emit("migration-postcopy-" + status.split("-")[1],
                         {"role": "destination", "at_s": ev["monotonic_s"]})
        elif status == "failed":
            self.timeline["failed_s"] = ev["monotonic_s"]
            self.vm.emit("migration-failed", {"role": "destination", "at_s": ev["monotonic_s"]})

    async def _resume(self, postcopy: bool = False) -> None:
        vm = self.vm
        async def stamped(key: str, step: Awaitable[Any]) -> Any:
            out = await step
            self.timeline[key] = time.monotonic()
            return out
        try:
            # One round trip for the three (QMP runs a monitor's commands in the order they arrive; all three are
            # sent at once): the NBD server goes first (its writable export would conflict with the guest's disk
            # once cont activates the images), then the written-since-resume bitmaps, then cont. In post-copy
            # cont may come before the device state is loaded: QEMU then only records autostart and starts the
            # guest itself once it can run (RESUME).
            # cont_s: the instant cont can start to run (what is before it has answered). Outside post-copy the
            # guest runs again from inside cont, and cont's reply came up to 6 ms later (measured, TCG): the
            # guest's clock stood still until about cont_s, not resumed_s.
            steps: list[Awaitable[Any]] = []
            if vm.spec.disks:
                steps += [stamped("nbd_stopped_s", vm.execute("nbd-server-stop")),
                          stamped("bitmaps_s", self._track_writes())]
            steps.append(vm.execute("cont"))
            sent_s = time.monotonic()
            for r in await asyncio.gather(*steps, return_exceptions=True):
                if isinstance(r, BaseException):
                    raise r
            if not postcopy:
                self.timeline["cont_s"] = self.timeline.get("bitmaps_s", sent_s)
            if postcopy:
                deadline = time.monotonic() + 60
                while (await vm.execute("query-status"))["status"] != "running":
                    if time.monotonic() > deadline:
                        raise QemuError(f"VM {vm.spec.name}: post-copy started but the guest did not "
                                        "run within 60 s")
                    await asyncio.sleep(0.002)
            self.timeline["resumed_s"] = time.monotonic()
            self.resumed.set()
            vm.emit("migration-resumed", dict(self.timeline))
            with contextlib.suppress(QemuError):
                await vm.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})
        except QemuError as err:
            log.error("VM %s: resuming after migration failed: %s", vm.spec.name, err)
            vm.emit("migration-failed", {"role": "destination", "error": str(err), "at_s": time.monotonic()})
        finally:
            if not postcopy:   # post-copy still has events to react to (completed, paused)
                with contextlib.suppress(ValueError):
                    vm.event_hooks.remove(self._on_event)

    async def _track_writes(self) -> None:
        """Before the guest runs here: a dirty bitmap on each disk, so the verdict can tell the guest's own writes
        after the resume from damage (``diskcheck.point_in_time``). Without it the disk can only be unverified."""
        from testbed.hostd.diskcheck import BITMAP_GRANULARITY, WRITTEN_BITMAP
        if not self.vm.spec.disks:
            return
        try:   # one round trip for all disks: this is on the switchover path
            await self.vm.execute("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": f"disk{i}", "name": WRITTEN_BITMAP,
                                                             "granularity": BITMAP_GRANULARITY}}
                for i, _ in enumerate(self.vm.spec.disks)]})
        except QemuError as err:
            log.warning("VM %s: no written-since-resume bitmaps: %s", self.vm.spec.name, err)

    async def abort(self) -> None:
        """Decide that the guest will not run here, or say that it already does (``Conflict``).

        The flag is set before the first await, so the resume this role starts on its own when the source
        completes cannot slip in between the check and the kill that follows it; a resume already under way is
        waited for, then the guest's state is read."""
        self.aborted = True
        if self._reaction is not None and not self._reaction.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._reaction)
        if self.resumed.is_set():
            raise Conflict(f"VM {self.vm.spec.name} already runs on this host: the move completed here",
                           hint="commit the move instead of aborting it")

    async def recover(self) -> str:
        """Post-copy recovery, destination side: listen for the source on a new port."""
        self.migration_port = free_port(self.address)
        uri = f"tcp:{self.address}:{self.migration_port}"
        await self.vm.execute("migrate-recover", {"uri": uri})
        return uri

    async def pause(self) -> None:
        await self.vm.execute("migrate-pause")

    def detach(self) -> None:
        with contextlib.suppress(ValueError):
            self.vm.event_hooks.remove(self._on_event)


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
            self.vm.emit("migration-failed", {"role": "source", "error": str(err), "at_s": time.monotonic()})
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
                    self.vm.emit("migration-sdps", decision)
            self.vm.emit("migration-progress", {
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
                vm.emit("migration-switchover-held", dict(self.timeline))
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
            vm.emit("migration-switchover", dict(self.timeline))
        except (TimeoutError, QemuError) as err:
            log.error("VM %s: switchover failed: %s", vm.spec.name, err)
            vm.emit("migration-failed", {"role": "source", "error": f"switchover failed: {err}",
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
        await self.vm.execute("migrate-pause")

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
