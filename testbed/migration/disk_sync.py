"""DISK_SYNC: the destination's empty disks exported over NBD on its vMotion address, ``blockdev-mirror``
(write-blocking, or background with a throttle) from the source until every job has copied its disk, within a
deadline."""

from __future__ import annotations

import asyncio
import time

from testbed.errors import MigrationError
from testbed.hostd.protocol import EventKind
from testbed.migration.request import disk_sync_timeout_s
from testbed.migration.state import MoveState


class DiskSyncPhase(MoveState):
    """The disk copy before the memory pre-copy."""

    async def _disk_sync(self) -> None:
        assert self.src and self.dst
        req = self.req
        for d in self.dest_spec.disks:
            await self.dst.call("disk.create", datastore=d.datastore, file=d.file, size_bytes=d.size_bytes,
                                format=d.format)
            self.created_disks.append((d.datastore, d.file))
        self.dest_started = True
        incoming = await self.dst.call("migration.prepare_incoming", spec=self.dest_spec.model_dump(),
                                       streams=req.streams, postcopy=self.ctl.postcopy_capable)
        self.uri = incoming["uri"]
        self.incoming = incoming     # the destination's NBD export and migration URI (fault injection reads it)
        if not req.spec.disks:
            return
        self.source_touched = True
        jobs = await self.src.call("migration.mirror", name=self.name, nbd_host=incoming["nbd"]["host"],
                                   nbd_port=incoming["nbd"]["port"], mode=req.mirror_mode,
                                   granularity=req.mirror_granularity)
        await self._checkpoint("disk-sync:mirror-started")
        ready: set[str] = set()
        lengths: dict[str, int] = {}

        async def poll() -> None:
            assert self.src
            while True:
                info = await self.src.call("vm.qmp", name=self.name, command="query-block-jobs")
                tot = sum(j["len"] for j in info if j["device"] in jobs) or 1
                off = sum(j["offset"] for j in info if j["device"] in jobs)
                for j in info:
                    lengths[j["device"]] = j["len"]
                self.progress.disk_pct = 100.0 * off / tot
                self.on_progress(self.progress)
                mine = [j for j in info if j["device"] in jobs]
                if len(mine) == len(jobs) and all(j["len"] and j["offset"] >= j["len"] for j in mine):
                    # every byte copied: READY follows once the destination has flushed, which the memory
                    # pre-copy need not wait for (the source agent holds the switchover until then)
                    await self.sq.put({"event": EventKind.MIRROR_COPIED.value, "data": {}})
                    return
                await asyncio.sleep(0.1)

        limit_s = self._disk_sync_timeout()
        deadline = time.monotonic() + limit_s
        poller = asyncio.create_task(poll())
        try:
            while ready != set(jobs):
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise TimeoutError
                    # no event for the whole wait: a stalled mirror, unless the deadline came first
                    stall_s = req.stall_timeout_s * 10
                    ev = await self._next_event(timeout_s=min(stall_s, left), what="the disk mirror",
                                                quiet=TimeoutError if left < stall_s else None)
                except TimeoutError:
                    why = ("the guest writes faster than the link takes them; use mirror mode write-blocking (the "
                           "guest's writes then wait for the destination) or a faster link"
                           if req.mirror_mode != "write-blocking" else
                           "the link carries less than the disks hold in that time; allow longer "
                           "(disk_sync_timeout_s) or use a faster link")
                    raise MigrationError(
                        f"the disk copy to {self.where(req.destination)} did not catch up in {limit_s:.0f} s "
                        f"({self.progress.disk_pct:.0f}% copied, mirror {req.mirror_mode}): {why}") from None
                if ev.kind is EventKind.MIRROR_COPIED:
                    break
                if ev.qmp_event == "BLOCK_JOB_READY":
                    ready.add(ev.qmp_data["device"])
                    lengths[ev.qmp_data["device"]] = ev.qmp_data["len"]
                elif ev.qmp_event in ("BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"):
                    job = ev.qmp_data
                    raise MigrationError(
                        f"disk mirror {job.get('device')} to {self.where(req.destination)} stopped before it was "
                        f"ready ({ev.qmp_event}, {job.get('operation') or job.get('error') or 'no detail'}): the "
                        "destination's NBD export failed or went away")
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        self.bytes.disk = sum(lengths.values())
        self.progress.disk_pct = 100.0
        self.on_progress(self.progress)

    def _disk_sync_timeout(self) -> float:
        return disk_sync_timeout_s(self.req.spec, self.req.disk_sync_timeout_s,
                                   self.req.bandwidth_bps or self.req.link_bandwidth_bps)
