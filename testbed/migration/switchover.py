"""SWITCHOVER: the agents switch over on their own (``testbed.hostd.migration``); the engine watches and
takes QEMU's downtime and its own instants, on one clock (``clock``)."""

from __future__ import annotations

from testbed.errors import TestbedError
from testbed.migration import clock
from testbed.migration.postcopy import PostcopyPhase
from testbed.migration.report import Switchover


class SwitchoverPhase(PostcopyPhase):
    """Watching the switchover; reading its figures."""

    async def _switchover(self) -> None:
        assert self.src and self.dst
        if self.req.hold_switchover:
            await self._checkpoint("switchover:held")
            await self.src.call("migration.release_switchover", name=self.name)
        while self.at.resumed_s is None:   # the instants are taken as their events are read (``_next_event``)
            await self._next_event(timeout_s=60, what="the switchover")
        if self.postcopy is not None:
            await self._postcopy_finish()
        qemu_steps = await self._qemu_steps()
        final = await self.src.call("vm.qmp", name=self.name, command="query-migrate")
        ram = final.get("ram", {})
        self.downtime.reported = final.get("downtime")
        resumed = self.at.of("resumed_s")
        if "src-downtime-start" in qemu_steps:
            self.downtime.stop_to_resume = round((resumed - qemu_steps["src-downtime-start"]) * 1000, 1)
            # how long the guest's clock stood still: to the start of cont, where the guest runs again
            self.frozen_s = (self.at.cont_s or resumed) - qemu_steps["src-downtime-start"]
        self.bytes.memory = int(ram.get("transferred", 0))
        t0 = self.machine.t0
        instants = {k: getattr(self.at, m) for k, m in (
            ("source_paused_s", "paused_s"), ("mirror_done_s", "mirror_done_s"), ("continued_s", "continued_s"),
            ("completed_s", "completed_s"), ("destination_nbd_stopped_s", "nbd_stopped_s"),
            ("destination_bitmaps_s", "bitmaps_s"), ("destination_resumed_s", "resumed_s"))}
        self.switch = Switchover(**{k: round(v - t0, 4) for k, v in instants.items() if v is not None},
            qemu={k: round(v - t0, 4) for k, v in sorted(qemu_steps.items(), key=lambda kv: kv[1])})

    async def _qemu_steps(self) -> dict[str, float]:
        """QEMU's own switchover checkpoints on both sides (its downtime trace), on the engine's clock."""
        assert self.src and self.dst
        steps: dict[str, float] = {}
        for side, agent in (("source", self.src), ("destination", self.dst)):
            try:
                got = await agent.call("vm.downtime_trace", name=self.name)
            except TestbedError:
                continue
            clock.map_instants(got, self.clocks[side])
            steps.update({k.removesuffix("_s"): float(v) for k, v in got.items()})
        return steps
