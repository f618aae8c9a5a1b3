"""Asynchronous disk mirroring for long distance: a background mirror, with the guest's writes throttled
while the mirror's backlog grows (what XvMotion did instead of waiting a round trip per write).

``blockdev-mirror`` with ``copy-mode: background`` lets guest writes complete locally; the mirror
copies the dirtied blocks later. If the guest writes faster than the link drains them, the backlog
(bytes not yet on the destination: the job's ``len - offset``) grows without bound: the first copy
never ends, or the switchover, which must drain it with the guest paused, gets long. So this loop
samples the backlog every ``period_s``: while it is above ``high`` and growing (or above ``high``
once READY) it caps the guest's write rate (``block_set_io_throttle``) at ``share`` of the rate
the mirror drains, lowering the cap as needed; below ``low`` it lifts the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from testbed.errors import QemuError
from testbed.hostd.vm import VmProcess

log = logging.getLogger("testbed.hostd.mirror_throttle")
MiB = 1024**2
ZERO = {k: 0 for k in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")}


class MirrorThrottle:
    def __init__(self, vm: VmProcess, jobs: dict[str, str], high: int = 8 * MiB, low: int = 2 * MiB,
                 share: float = 0.5, floor_bps: int = 256 * 1024, period_s: float = 0.2) -> None:
        self.vm = vm
        self.jobs = jobs            # block job id -> qdev id of the guest's disk
        self.high, self.low, self.share, self.floor_bps, self.period_s = high, low, share, floor_bps, period_s
        self.limits: dict[str, int] = {}        # qdev id -> bytes/s cap in force (absent: none)
        self.events: list[dict[str, Any]] = []  # every change, for the report
        self.max_backlog = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _set(self, dev: str, bps_wr: int, backlog: int) -> None:
        # virtio-blk-pci is a proxy: the block backend belongs to its virtio-backend child
        await self.vm.execute("block_set_io_throttle", {"id": f"/machine/peripheral/{dev}/virtio-backend",
                                                        **ZERO, "bps_wr": bps_wr})
        if bps_wr:
            self.limits[dev] = bps_wr
        else:
            self.limits.pop(dev, None)
        self.events.append({"t_s": time.monotonic(), "device": dev, "bps_wr": bps_wr, "backlog_bytes": backlog})
        log.info("VM %s: mirror throttle %s: guest writes %s (mirror backlog %d bytes)", self.vm.spec.name, dev,
                 f"capped at {bps_wr} B/s" if bps_wr else "uncapped", backlog)

    async def _loop(self) -> None:
        last: dict[str, tuple[float, int, int]] = {}     # dev -> (time, offset, backlog) one period ago
        try:
            while True:
                now = time.monotonic()
                for j in await self.vm.execute("query-block-jobs"):
                    dev = self.jobs.get(j["device"])
                    if dev is None:
                        continue
                    offset, backlog = int(j["offset"]), int(j["len"]) - int(j["offset"])
                    self.max_backlog = max(self.max_backlog, backlog)
                    t0, off0, backlog0 = last.get(dev, (now, offset, backlog))
                    last[dev] = (now, offset, backlog)
                    drain = (offset - off0) / (now - t0) if now > t0 else 0.0
                    # Act when the backlog is large and the guest outruns the mirror (the backlog grows):
                    # during the first copy as well as after READY.
                    if backlog > self.high and (backlog > backlog0 or j.get("ready")):
                        cap = max(self.floor_bps, int(self.share * drain))
                        current = self.limits.get(dev)
                        if current is None or cap < 0.9 * current:
                            await self._set(dev, cap, backlog)
                    elif backlog < self.low and dev in self.limits:
                        await self._set(dev, 0, backlog)
                await asyncio.sleep(self.period_s)
        except QemuError as err:
            log.warning("VM %s: mirror throttle stopped: %s", self.vm.spec.name, err)

    async def stop(self) -> None:
        """Stop sampling and lift every cap (the switchover drains the rest; a rollback runs unthrottled)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for dev in list(self.limits):
            with contextlib.suppress(QemuError):
                await self._set(dev, 0, -1)

    def summary(self) -> dict[str, Any]:
        caps = [e["bps_wr"] for e in self.events if e["bps_wr"]]
        return {"throttle_changes": len(self.events), "min_cap_bps": min(caps) if caps else None,
                "max_backlog_bytes": self.max_backlog}
