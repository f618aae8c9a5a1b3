"""Never two running copies: the hand-over rules of the agents' migration roles, against a model QEMU.

The destination's agent resumes the guest by itself when its QEMU reports the migration completed; a rollback
that asks it to stop the incoming VM can arrive at any moment around that. The source's agent must not resume a
guest whose migration completed unless the caller has stopped the destination. (A vCenter restarted in the
middle of a move hit exactly this window on a busy CI machine: the destination had not resumed yet when it was
asked, the source was resumed, then the destination resumed too.) The model QEMU answers the QMP commands the
roles send, with QEMU's run states; ``cont`` takes as long as a destination loading the device state."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from testbed.errors import Conflict
from testbed.hostd.destination import DestinationRole
from testbed.hostd.source import SourceRole


class ModelQemu:
    def __init__(self, status: str, migration: str | None = None, cont_s: float = 0.0) -> None:
        self.status, self.migration, self.cont_s = status, migration, cont_s
        self.sent: list[str] = []
        self.event_hooks: list[Any] = []
        self.alive = True
        self.spec = SimpleNamespace(name="vm1", disks=())
        self.emitted: list[str] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.sent.append(command)
        if command == "cont":
            await asyncio.sleep(self.cont_s)
            self.status = "running"
        elif command == "query-status":
            return {"status": self.status}
        elif command == "query-migrate":
            return {"status": self.migration} if self.migration else {}
        elif command == "migrate_cancel" and self.migration == "active":
            self.migration = "cancelled"
        return {}

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        self.emitted.append(kind)

    def complete(self) -> None:
        """QEMU's MIGRATION event: the incoming state is loaded."""
        self.status = "paused"
        for hook in list(self.event_hooks):
            hook({"event": "MIGRATION", "data": {"status": "completed"}, "monotonic_s": 0.0})


def destination(cont_s: float = 0.0) -> tuple[DestinationRole, ModelQemu]:
    vm = ModelQemu("inmigrate", cont_s=cont_s)
    role = DestinationRole(vm, "198.18.0.1")  # type: ignore[arg-type]
    vm.event_hooks.append(role._on_event)
    return role, vm


def test_an_aborted_destination_does_not_resume_when_the_source_completes_later() -> None:
    async def go() -> None:
        role, vm = destination()
        await role.abort()
        vm.complete()
        await asyncio.sleep(0.05)
        assert "cont" not in vm.sent and vm.status == "paused" and not role.resumed.is_set()
    asyncio.run(go())


def test_an_abort_during_the_destinations_own_resume_waits_for_it_and_is_refused() -> None:
    async def go() -> None:
        role, vm = destination(cont_s=0.3)       # the device state takes 0.3 s to load
        vm.complete()                             # the resume starts...
        await asyncio.sleep(0.01)
        assert vm.status == "paused"              # ...and has not run the guest yet
        with pytest.raises(Conflict, match="already runs on this host"):
            await role.abort()
        assert vm.status == "running" and role.resumed.is_set()
    asyncio.run(go())


def test_a_destination_resumes_by_itself_when_not_aborted() -> None:
    async def go() -> None:
        role, vm = destination()
        vm.complete()
        await asyncio.wait_for(role.resumed.wait(), 2)
        assert vm.status == "running"
    asyncio.run(go())


@pytest.mark.parametrize("resume_completed", [False, True])
def test_the_source_of_a_completed_migration_resumes_only_when_told_the_destination_is_stopped(
        resume_completed: bool) -> None:
    async def go() -> None:
        vm = ModelQemu("postmigrate", migration="completed")
        role = SourceRole(vm, run_dir=Path("/nonexistent"))  # type: ignore[arg-type]
        r = await role.cancel(resume_completed=resume_completed)
        assert r["completed"] is True
        assert ("cont" in vm.sent) is resume_completed
        assert vm.status == ("running" if resume_completed else "postmigrate")
        if not resume_completed:
            assert any("stays paused" in u for u in r["undone"]), r
    asyncio.run(go())


def test_the_source_of_an_active_migration_is_cancelled_and_resumed() -> None:
    async def go() -> None:
        vm = ModelQemu("paused", migration="active")
        role = SourceRole(vm, run_dir=Path("/nonexistent"))  # type: ignore[arg-type]
        r = await role.cancel()
        assert r["completed"] is False and "migrate_cancel" in vm.sent and vm.status == "running", r
    asyncio.run(go())
