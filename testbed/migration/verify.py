"""VERIFY (``integrity``): the guest's own checks, disk digests at one instant, the outage in sequence numbers."""

from __future__ import annotations

import asyncio
from typing import Any

from testbed.errors import TestbedError
from testbed.migration import integrity
from testbed.migration.state import MoveState


class VerifyPhase(MoveState):
    """The checks after the move, whose verdict decides commit or keep."""

    async def _verify(self) -> None:
        assert self.src and self.dst
        await self._checkpoint("verify")
        integ = self.integrity
        # the observer timestamps heartbeats with its own clock: ask it in its terms
        ob = self.clocks["observer"]
        paused, resumed = ob.to_remote(self.at.of("paused_s")), ob.to_remote(self.at.of("resumed_s"))
        st = await self.dst.call("vm.status", name=self.name)
        if st.get("status") != "running":
            integ.details.append(f"destination QEMU is {st.get('status')}, not running")
        if self.req.builtin_guest:
            # The last heartbeat before the pause: both checks below compare against it.
            self.hb_before = await integrity.heartbeat_before(self.req.observer_socket, self.name, paused)
            # Digesting the disks takes the CPU (here, both cores): not before the guest is up again, or the check
            # would lengthen the downtime it measures.
            await integrity.guest_back(self.req.observer_socket, self.name, resumed)
        disk_task = asyncio.create_task(self._verify_disks())
        try:
            if self.req.builtin_guest:
                await self._verify_guest(paused, resumed)
            else:
                integ.guest_running = st.get("status") == "running"
                integ.memory = "unverified"
                integ.details.append("memory unverified: the guest has no testbed agent")
        except BaseException:
            disk_task.cancel()
            await asyncio.gather(disk_task, return_exceptions=True)
            raise
        await disk_task

    async def _verify_guest(self, paused: float, resumed: float) -> None:
        ob = self.clocks["observer"]
        times = await integrity.check_guest(
            self.req.observer_socket, self.name, self.hb_before, precopy_s=ob.to_remote(self.at.of("migrate_s")),
            paused_s=paused, resumed_s=resumed, workload=self.req.workload, integ=self.integrity,
            frozen_s=self.frozen_s,
            threshold_ms=self.stalls.threshold_ms)
        self.stalls = times.stalls
        self.downtime.observed = times.observed_ms
        self.downtime.observed_naive = times.naive_ms
        self.downtime.path_change = times.path_change_ms
        if times.gap_start_s is not None and times.gap_end_s is not None:
            self.switch.heartbeat_gap_start_s = round(ob.to_engine(times.gap_start_s) - self.machine.t0, 4)
            self.switch.heartbeat_gap_end_s = round(ob.to_engine(times.gap_end_s) - self.machine.t0, 4)

    async def _verify_disks(self) -> None:
        assert self.src and self.dst
        integ = self.integrity
        spec = self.req.spec
        if not spec.disks:
            integ.disk = "none"
            integ.details.append("disk: none, the VM has no disks")
            return
        verdicts = []
        for i, s_disk in enumerate(spec.disks):
            # the source image is frozen (its QEMU inactivated it at the end of the migration): its file is read;
            # the destination's guest runs: read through its QEMU at one instant, with what it wrote since
            try:
                a, b = await asyncio.gather(
                    self.src.call("disk.digest", datastore=s_disk.datastore, file=s_disk.file, timeout_s=300),
                    self.dst.call("disk.digest_live", name=self.name, disk=i, timeout_s=300))
            except TestbedError as err:
                integ.details.append(f"disk {s_disk.file} unverified: could not compare ({err.message})")
                verdicts.append("unverified")
                continue
            verdicts.append(self._judge_disk(s_disk.file, a, b))
        integ.disk = "failed" if "failed" in verdicts else ("unverified" if "unverified" in verdicts else "verified")

    def _judge_disk(self, file: str, src: dict[str, Any], dst: dict[str, Any]) -> str:
        return integrity.judge_disk(file, src, dst, builtin_guest=self.req.builtin_guest, workload=self.req.workload,
                                    hb0=self.hb_before, details=self.integrity.details)
