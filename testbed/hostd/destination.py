"""The destination host's side of a live migration (``DestinationRole``): QEMU waiting for the incoming
stream, the NBD export of its disks, and the resume. The whole exchange: ``migration``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable
from typing import Any

from testbed.errors import Conflict, QemuError
from testbed.hostd.migration import caps
from testbed.hostd.protocol import EventKind
from testbed.hostd.vm import VmProcess

log = logging.getLogger("testbed.hostd.migration.destination")


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
            self.vm.emit(EventKind.MIGRATION_COMPLETED, {"role": "destination", "at_s": ev["monotonic_s"]})
        elif status in ("postcopy-paused", "postcopy-recover"):
            self.vm.emit(EventKind.MIGRATION_POSTCOPY_PAUSED if status == "postcopy-paused"
                         else EventKind.MIGRATION_POSTCOPY_RECOVER,
                         {"role": "destination", "at_s": ev["monotonic_s"]})
        elif status == "failed":
            self.timeline["failed_s"] = ev["monotonic_s"]
            self.vm.emit(EventKind.MIGRATION_FAILED, {"role": "destination", "at_s": ev["monotonic_s"]})

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
            vm.emit(EventKind.MIGRATION_RESUMED, dict(self.timeline))
            with contextlib.suppress(QemuError):
                await vm.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})
        except QemuError as err:
            log.error("VM %s: resuming after migration failed: %s", vm.spec.name, err)
            vm.emit(EventKind.MIGRATION_FAILED, {"role": "destination", "error": str(err), "at_s": time.monotonic()})
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
        await self.vm.execute("migrate-recover", {"uri": uri}, oob=True)
        return uri

    async def pause(self) -> None:
        await self.vm.execute("migrate-pause", oob=True)

    def detach(self) -> None:
        with contextlib.suppress(ValueError):
            self.vm.event_hooks.remove(self._on_event)
