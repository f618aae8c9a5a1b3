"""Post-copy: the guest runs on the destination while its last pages come from the source; a broken
channel pauses both sides, and the engine reconnects them (post-copy recovery)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from testbed.errors import MigrationError, TestbedError
from testbed.hostd.protocol import EventKind
from testbed.hosts.agent import Agent
from testbed.migration.state import MoveState

# The longest one agent call of the recovery may take. The management network to the far host crosses the link
# that broke, and a QEMU whose main thread waits on a missing page answers no in-band command: a call without a
# deadline could wait for ever (it did once in CI), where the recovery must end at its own deadline.
RECOVERY_CALL_S = 5.0


class PostcopyPhase(MoveState):
    """Waiting for post-copy's last page, and recovering a broken channel."""

    async def _postcopy_finish(self) -> None:
        """The guest runs on the destination; its remaining pages come from the source. Wait for the last
        one; a broken channel pauses both sides, and the engine reconnects them (post-copy recovery)."""
        assert self.src and self.dst and self.postcopy is not None
        pc, req, t0 = self.postcopy, self.req, self.machine.t0
        pc.destination_running_s = round(self.at.of("resumed_s") - t0, 4)
        await self._checkpoint("postcopy:running")
        last_tx, last_move = -1, time.monotonic()
        recovered_at = 0.0
        while True:
            ev = await self._next_event(timeout_s=req.stall_timeout_s, what="the post-copy")
            if ev.side != "source":
                continue
            if ev.migration_status() == "completed" and ev.at_s is not None:
                pc.completed_s = round(ev.at_s - t0, 4)
                return
            if ev.kind is not EventKind.MIGRATION_PROGRESS:
                continue
            st = ev.data
            if st["t_s"] < recovered_at:
                continue   # sampled while the channel was down, queued behind the recovery: not news
            self._update_progress(st)
            if st["status"] == "completed":
                pc.completed_s = round(st["t_s"] - t0, 4)
                return
            if st["transferred_bytes"] != last_tx:
                last_tx, last_move = st["transferred_bytes"], time.monotonic()
            stuck = st["status"] == "postcopy-active" and time.monotonic() - last_move > req.stall_timeout_s
            if stuck or st["status"] == "postcopy-paused":
                await self._postcopy_recover(stuck)
                last_tx, last_move = -1, time.monotonic()
                recovered_at = time.monotonic()

    async def _postcopy_recover(self, stuck: bool) -> None:
        assert self.src and self.dst and self.postcopy is not None
        req, pc = self.req, self.postcopy
        pc.pauses += 1
        n = len(self.rounds)
        why = (f"no post-copy page sent for {req.stall_timeout_s:.0f} s" if stuck
               else "the source reports postcopy-paused")
        self._decide(n, "postcopy-pause", None, f"{why}: both sides paused (migrate-pause); the guest waits on "
                                                "the destination for pages only the source has")
        deadline = time.monotonic() + req.postcopy_recovery_timeout_s

        async def ask(agent: Agent, method: str, limit_s: float = RECOVERY_CALL_S, **params: Any) -> Any:
            """One call, bounded by ``limit_s`` and the recovery's own deadline: no answer is None."""
            try:
                return await agent.call(method, timeout_s=min(limit_s, max(0.1, deadline - time.monotonic())),
                                        **params)
            except TimeoutError:
                return None

        async def pause(agent: Agent, limit_s: float = RECOVERY_CALL_S) -> None:
            with contextlib.suppress(TestbedError):
                await ask(agent, "migration.pause", limit_s, name=self.name)

        # both sides at once, and at most a quarter of the deadline: the status reads below must get their turn
        await asyncio.gather(*(pause(a, req.postcopy_recovery_timeout_s / 4) for a in (self.src, self.dst)))
        uri: str | None = None
        tries = 0
        seen = {"destination": "not asked", "source": "not asked", "resume": "not tried"}
        while time.monotonic() < deadline:
            # the destination's status by name (a ticket's connection has no raw QMP there)
            dst_ans, src_ans = await asyncio.gather(
                ask(self.dst, "migration.status", name=self.name),
                ask(self.src, "vm.qmp", name=self.name, command="query-migrate"))
            dst_st, src_st = ((ans or {}).get("status", "no answer") for ans in (dst_ans, src_ans))
            seen.update(destination=str(dst_st), source=str(src_st))
            if src_st == "completed":
                return
            if src_st in ("postcopy-active", "postcopy-recover") and dst_st in ("postcopy-active", "postcopy-recover") \
                    and tries:
                pc.recoveries += 1
                self._decide(n, "postcopy-recover", None, f"reconnected to {uri} after {tries} tries "
                             "(migrate-recover on the destination, migrate resume=true on the source)")
                return
            if "postcopy-active" in (src_st, dst_st) and not tries:
                # a side whose read of the dead channel has not failed yet: pause it again
                for agent, st in ((self.src, src_st), (self.dst, dst_st)):
                    if st == "postcopy-active":
                        await pause(agent)
            elif src_st == "postcopy-paused" and dst_st in ("postcopy-paused", "postcopy-recover-setup"):
                if uri is None:
                    try:
                        answer = await ask(self.dst, "migration.recover", name=self.name)
                        uri = answer["uri"] if answer else None
                        seen["resume"] = "migrate-recover on the destination: no answer" if uri is None else "listening"
                    except TestbedError as err:
                        seen["resume"] = f"migrate-recover on the destination: {err.message.splitlines()[0]}"
                if uri is not None:
                    res = await ask(self.src, "migration.resume", name=self.name, uri=uri)
                    if res is None:
                        seen["resume"] = "migrate resume=true on the source: no answer"
                    else:
                        seen["resume"] = "started" if res["resumed"] else res.get("why", "refused")
                        tries += 1 if res["resumed"] else 0
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        raise MigrationError(
            f"post-copy of {self.name} lost its channel ({why}) and the vMotion network between "
            f"{req.source.host.name} and {req.destination.host.name} did not come back within "
            f"{req.postcopy_recovery_timeout_s:.0f} s (last seen: source {seen['source']}, destination "
            f"{seen['destination']}, reconnect: {seen['resume']}): the guest's memory is split between both "
            "hosts, so it "
            "cannot run on either. Both QEMUs are kept (source paused, destination waiting for pages) "
            "for inspection; nothing was committed. Restore the link and resume by hand "
            "(migrate-recover on the destination, migrate resume=true on the source), or delete the VM")
