"""What the vCenter's unit tests share (a helper module, not a test module): the scripted agents of a source and a
destination host reached where the vCenter dials them, a relocate task as a vCenter that stopped mid-move left it,
and the vCenter's restart recovery run to its end."""

from __future__ import annotations

import asyncio
from typing import Any

from testbed.errors import NotFound
from testbed.vcenter.service import VCenter
from testbed.vcenter.tasks import Stage
from tests.unit.fake_agent import FakeAgent, spec

VM = spec()


def agents(vc: VCenter, source_migration: list[str] | str) -> tuple[FakeAgent, FakeAgent]:
    """esx-a1 (the source, its QEMU's ``query-migrate`` answering ``source_migration`` in turn) and esx-b1."""
    src, dst = FakeAgent("esx-a1"), FakeAgent("esx-b1")
    states = [source_migration] if isinstance(source_migration, str) else list(source_migration)

    def qmp(name: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert command == "query-migrate"
        if states[0] == "VM gone":
            raise NotFound(f"VM {name!r} is not on host esx-a1")
        return {"status": states.pop(0) if len(states) > 1 else states[0]}

    src.on("vm.qmp", qmp)
    for a in (src, dst):
        for m in ("migration.finish", "vm.stop", "vm.remove", "disk.delete"):
            a.on(m, None)
    src.on("migration.cancel", lambda name, resume_completed: {
        "undone": ["source migration cancelled"] + (["source VM resumed"] if resume_completed else []),
        "completed": True})
    dst.on("migration.abort_incoming", {"undone": ["destination QEMU stopped"]})
    vc._agents.update({"esx-a1": src, "esx-b1": dst})   # the vCenter's kept-open connection per host
    return src, dst


def interrupted_task(vc: VCenter, stage: Stage = Stage.MIGRATING, cross: bool = False) -> dict[str, Any]:
    """What the inventory holds when the vCenter stopped in ``stage`` of a move of vm1 from esx-a1 to esx-b1."""
    vc.inv.put_vm({"name": "vm1", "host": "esx-a1", "state": "registered", "spec": VM.model_dump(mode="json"),
                   "history": [], "builtin_guest": True})
    dvc = {"url": "https://vc-b.unit.test", "thumbprint": "ab" * 32, "name": "vc-b"} if cross else None
    t = vc.new_task("VirtualMachine.relocate", "vm1", "relocate VM vm1 from esx-a1 to esx-b1", "u",
                    source_host="esx-a1", placement={"host": "esx-b1", "datastore": "ds-b"}, options={},
                    destination_vcenter=dvc, stage=Stage.PRECHECKS.value)
    if cross:
        t["admission"] = "adm-1"
        vc.set_stage(t, Stage.ADMITTED)
    if stage in (Stage.MIGRATING, Stage.COMMITTED):
        vc.set_stage(t, Stage.MIGRATING)
    return t


async def restart(vc: VCenter) -> dict[str, Any]:
    await vc.recover()
    await asyncio.gather(*vc.running.values())
    assert not vc.busy, "recovery releases the VM"
    (t,) = vc.inv.tasks()
    return t
