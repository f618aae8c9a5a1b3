"""How a move ends: COMMIT (only when memory and every disk are verified), the source kept paused (FAILED or
UNVERIFIED), or ROLLBACK before the switchover: the destination is stopped first, then the source resumes:
never two running copies, never none."""

from __future__ import annotations

import contextlib

from testbed.errors import Conflict, NotFound, TestbedError
from testbed.hosts.agent import remove_vm
from testbed.migration.phases import Phase
from testbed.migration.state import ROLLBACK_CALL_S, MoveState


class Ending(MoveState):
    """Commit, keep the source, or roll back."""

    async def _keep_source(self) -> None:
        """FAILED or UNVERIFIED: the destination runs the VM; the source QEMU stays, paused, with its disks."""
        assert self.src and self.dst
        self.source_kept = True
        for side in (self.src, self.dst):
            with contextlib.suppress(TestbedError, TimeoutError):
                await side.call("migration.finish", name=self.name, timeout_s=ROLLBACK_CALL_S)

    async def _commit(self) -> None:
        assert self.src and self.dst
        with contextlib.suppress(TestbedError):
            console = (await self.src.call("vm.console_log", name=self.name))["text"]
            await self.dst.call("vm.import_console_history", name=self.name, text=console)
        await self.src.call("migration.finish", name=self.name)
        await self.dst.call("migration.finish", name=self.name)
        await remove_vm(self.src, self.req.spec, strict=True)

    async def _rollback(self, why: str) -> None:
        self.error = why
        if self.machine.phase in (Phase.COMMIT, Phase.DONE, Phase.FAILED, Phase.ROLLED_BACK, Phase.ROLLBACK):
            return
        if self.machine.phase is Phase.CREATED:
            self.machine.enter(Phase.PRECHECK)
        log = self.rollback_log
        assert self.src and self.dst
        # The destination may be out of reach (a cut link): each call there gets a time limit, and the
        # rollback goes on without it (what could not be removed is said in the log).
        t = ROLLBACK_CALL_S
        dest_stopped = not self.dest_started
        dest_silent = False      # the destination's agent did not answer in time
        if self.dest_started:
            # The destination goes first, in one call that refuses once the guest runs there (it resumes by
            # itself when the source completes): never two running copies.
            try:
                r = await self.dst.call("migration.abort_incoming", name=self.name, timeout_s=t)
                log += r["undone"] or [f"destination QEMU on {self.req.destination.host.name} was not running"]
                dest_stopped = True
            except Conflict:
                log.append("the destination already runs the VM: not rolled back; the source VM and disk "
                           "are kept, paused, for inspection")
                self._enter(Phase.FAILED)
                self.source_kept = True
                return
            except NotFound:
                dest_stopped = True
                log.append(f"destination QEMU on {self.req.destination.host.name}: not there")
            except TestbedError as err:
                log.append(f"destination QEMU: {err.message.splitlines()[0]}")
            except TimeoutError:
                dest_silent = True
                log.append(f"destination QEMU on {self.req.destination.host.name}: its agent did not answer in "
                           f"{t:.0f} s; the QEMU there waits for an incoming migration that will never come")
        self._enter(Phase.ROLLBACK)
        # An agent that did not answer the abort will not answer the rest: not asked again, so the source (whose
        # guest SDPS may still stun) is released now, not after a time limit per call.
        if self.dest_started and not dest_silent:
            with contextlib.suppress(TestbedError, TimeoutError):
                await self.dst.call("vm.remove", name=self.name, timeout_s=t)
            with contextlib.suppress(TestbedError, TimeoutError):
                await self.dst.call("migration.finish", name=self.name, timeout_s=t)
        for ds, f in self.created_disks:
            if dest_silent:
                log.append(f"destination disk {f}: not deleted, the agent on {self.req.destination.host.name} did "
                           "not answer; the disk is left there")
                continue
            try:
                await self.dst.call("disk.delete", datastore=ds, file=f, timeout_s=t)
                log.append(f"destination disk {f} deleted")
            except TestbedError as err:
                log.append(f"destination disk {f}: {err.message}")
            except TimeoutError:
                dest_silent = True
                log.append(f"destination disk {f}: the agent on {self.req.destination.host.name} did not answer "
                           f"in {t:.0f} s; the disk is left there")
        try:
            undone = await self.src.call("migration.cancel", name=self.name, resume_completed=dest_stopped)
            log += undone["undone"]
        except TestbedError as err:
            log.append(f"source: {err.message}")
        else:
            if undone.get("completed") and not dest_stopped:
                # the source handed the guest over and the destination could not be stopped: whether it runs
                # there is unknown, so the source stays paused (kept) rather than risk two running copies
                log.append(f"the source's migration had completed and {self.where(self.req.destination)} could "
                           "not be reached to stop the VM there: it may run there; the source copy stays paused")
                self._enter(Phase.FAILED)
                self.source_kept = True
                return
        self._enter(Phase.ROLLED_BACK)
