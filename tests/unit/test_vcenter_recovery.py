"""A vCenter that restarts during a relocate resolves the task from what the hosts report: the VM ends on exactly
one host, the inventory says which, and a source copy that still exists is recorded. A real ``VCenter`` on a
temporary directory (``conftest.vc``), its host agents scripted (``fake_agent``), no lab, no root."""

from __future__ import annotations

from typing import Any

import pytest

from testbed.errors import HostUnreachable
from testbed.vcenter.service import VCenter
from tests.unit.fake_agent import not_there
from tests.unit.vckit import VM, agents, interrupted_task, restart


class FakePeer:
    """The destination vCenter as the source's recovery reaches it (signed calls), recorded."""

    def __init__(self, running: bool) -> None:
        self.running = running
        self.calls: list[tuple[str, str]] = []
        self.closed = False

    async def aget(self, path: str, signed: bool = False) -> dict[str, Any]:
        self.calls.append(("GET", path))
        return {"running": self.running, "status": "running" if self.running else None}

    async def apost(self, path: str, body: dict[str, Any], signed: bool = False,
                    timeout_s: float | None = None) -> dict[str, Any]:
        self.calls.append(("POST", path))
        return {"undone": ["placeholder removed"]}

    def close(self) -> None:
        self.closed = True


async def test_switched_over_the_inventory_follows_and_the_source_copy_is_kept(vc: VCenter) -> None:
    src, dst = agents(vc, ["active", "active", "completed"])   # a migration still in flight: recovery waits
    dst.on("vm.status", {"state": "running", "status": "running"})
    interrupted_task(vc)
    t = await restart(vc)
    assert t["state"] == "SUCCEEDED" and t["verdict"] == "unverified" and t["stage"] == "committed"
    assert vc.inv.vm("vm1")["host"] == "esx-b1"
    assert vc.inv.vm("vm1")["spec"]["disks"][0]["datastore"] == "ds-b"
    copy = vc.inv.source_copy("vm1")
    assert copy is not None and copy["host"] == "esx-a1" and "integrity checks did not run" in copy["why"]
    assert src.methods().count("vm.qmp") == 3, "it waited for the source's migration to end"
    assert "migration.cancel" not in src.methods(), "a VM running on the destination is not rolled back"
    assert not {"migration.abort_incoming", "vm.stop", "vm.remove", "disk.delete"} & set(dst.methods())


async def test_source_already_removed_no_phantom_source_copy(vc: VCenter) -> None:
    agents(vc, "VM gone")[1].on("vm.status", {"state": "running", "status": "running"})
    interrupted_task(vc)
    t = await restart(vc)
    assert t["state"] == "SUCCEEDED" and vc.inv.vm("vm1")["host"] == "esx-b1"
    assert vc.inv.source_copy("vm1") is None, "a copy that is no longer on the host is not recorded"
    assert any("already removed by the engine" in n for n in t["notes"])


async def test_before_the_switchover_rolled_back_destination_first(vc: VCenter) -> None:
    src, dst = agents(vc, "failed")
    dst.on("vm.status", not_there)
    interrupted_task(vc)
    t = await restart(vc)
    assert t["state"] == "FAILED" and "rolled back and the VM runs on esx-a1" in t["error"]["message"]
    assert t["stage"] == "migrating" and vc.inv.vm("vm1")["host"] == "esx-a1"
    assert dst.methods()[:2] == ["vm.status", "migration.abort_incoming"]
    assert {"datastore": "ds-b", "file": "vm1-disk0.qcow2"} in dst.called("disk.delete"), \
        "the destination's copy of the disk is deleted"
    assert src.called("migration.cancel") == [{"name": "vm1", "resume_completed": True}]
    assert not src.called("disk.delete") and vc.inv.source_copy("vm1") is None


async def test_completed_but_destination_unreachable_stays_paused(vc: VCenter) -> None:
    src, dst = agents(vc, "completed")

    def unreachable(**_: Any) -> None:
        raise HostUnreachable("esx-b1: connection refused")
    dst.on("vm.status", unreachable)
    dst.on("migration.abort_incoming", unreachable)
    interrupted_task(vc)
    t = await restart(vc)
    assert t["state"] == "FAILED"
    assert "stays paused on esx-a1 rather than risk two running copies" in t["error"]["message"]
    assert src.called("migration.cancel") == [{"name": "vm1", "resume_completed": False}], \
        "the source is not resumed while the destination may run"
    assert vc.inv.vm("vm1")["host"] == "esx-a1"
    assert any("could not be stopped" in n for n in t["notes"])


async def test_cross_vcenter_switched_over_commits_at_the_peer(vc: VCenter, monkeypatch: pytest.MonkeyPatch) -> None:
    peer = FakePeer(running=True)
    monkeypatch.setattr(vc, "peer_client", lambda url, thumbprint, **kw: peer)
    src, dst = agents(vc, "completed")
    interrupted_task(vc, cross=True)
    t = await restart(vc)
    assert t["state"] == "SUCCEEDED" and t["verdict"] == "unverified"
    assert ("POST", "/api/testbed/xvmotion/adm-1/commit") in peer.calls and peer.closed
    assert vc.inv.vm("vm1") is None, "the VM now belongs to vc-b"
    assert vc.inv.source_copy("vm1")["destination_vcenter"] == "vc-b"
    assert not dst.calls, "the destination host is vc-b's: this vCenter does not touch it"


@pytest.mark.parametrize("cross", [False, True])
async def test_stopped_after_the_commit_only_the_ending_is_left(vc: VCenter, monkeypatch: pytest.MonkeyPatch,
                                                                cross: bool) -> None:
    """Stopped between the commit and the task's end: the task ends with the commit's verdict; the source copy
    still paused on the source is recorded; nothing is rolled back or committed twice."""
    peer = FakePeer(running=True)
    monkeypatch.setattr(vc, "peer_client", lambda url, thumbprint, **kw: peer)
    src, dst = agents(vc, "completed")
    t = interrupted_task(vc, cross=cross)
    v = vc.inv.vm("vm1")
    assert v is not None
    await vc._commit_move(t, v, VM, "esx-b1", "ds-b", peer if cross else None, "vc-b" if cross else "vc-t",
                          "unverified")
    if cross:
        vc.inv.put_vm(v)     # ... and stopped before the VM's row left this inventory
    peer.calls.clear()
    t = await restart(vc)
    assert t["state"] == "SUCCEEDED" and t["stage"] == "committed", t.get("error")
    assert not peer.calls, "committed once, not again"
    assert "migration.cancel" not in src.methods() and not dst.calls
    assert (vc.inv.vm("vm1") is None) if cross else (vc.inv.vm("vm1")["host"] == "esx-b1")
    if not cross:
        assert len(vc.inv.vm("vm1")["history"]) == 1
    copy = vc.inv.source_copy("vm1")
    assert copy is not None and "after the commit" in copy["why"]
    migrated = [e for e in vc.inv.events() if e["kind"] == "VmMigratedEvent"]
    assert len(migrated) == 1
