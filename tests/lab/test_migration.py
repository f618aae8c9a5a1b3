"""The XvMotion engine on the embedded lab, driven as a user drives it: every VM created, moved and deleted
through its vCenter. Moves that complete with integrity, and rollbacks that leave the VM running on the source
only, its disk as it was, nothing left on the destination. Faults are injected at the engine's checkpoints
(relocate breakpoints: the move holds there while the test does what the world would)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import labctl
from testbed.lab.topology import DatastoreSpec, HostSpec, SiteSpec, Topology, VCenterSpec
from testbed.vcenter import deploy
from testbed.vcenter.labvms import LabVms

from ..conftest import unique_lab_name
from .labkit import (
    HAPPY,
    MiB,
    agent,
    assert_moved,
    boot,
    digest,
    kill_destination,
    lab_vms,
    leftovers,
    own_guest,
    report_of,
    rollback_case,
    where,
)

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def mlab(lab_env: Path) -> Iterator[str]:
    """Two sites, their vCenters; esx-b2 has a 512 MiB datastore (too small for a 1 GiB disk); link capped at
    100 MiB/s."""
    name = unique_lab_name()

    def site(letter: str) -> SiteSpec:
        hosts = [HostSpec(name=f"esx-{letter}1"), HostSpec(
            name=f"esx-{letter}2", datastores=(DatastoreSpec(name=f"small-{letter}2", capacity_bytes=512 * MiB),)
            if letter == "b" else ())]
        return SiteSpec(name=f"site-{letter}", vcenter=VCenterSpec(name=f"vc-{letter}"), hosts=tuple(hosts))

    t = Topology(name=name, sites=(site("a"), site("b")))
    try:
        asyncio.run(deploy.up(t))
        labctl.set_link(name, change_bandwidth=True, bandwidth_bps=100 * MiB)
        yield name
    finally:
        labctl.down(name)


@pytest.fixture
async def mvms(mlab: str) -> AsyncIterator[LabVms]:
    async with lab_vms(mlab) as m:
        yield m


async def test_idle_vm_moves_across_vcenters_with_integrity(mvms: LabVms) -> None:
    await boot(mvms, "idle1", "esx-a1", "idle")
    r = assert_moved(await mvms.relocate("idle1", "esx-b1"), "esx-b1")
    assert r.source.vcenter == "vc-a" and r.destination.vcenter == "vc-b"
    assert await where(mvms, "idle1") == {"esx-b1": "running"}
    assert (await mvms.find("idle1"))[0] == "vc-b", "the VM belongs to the destination vCenter now"
    assert "TBAGENT start" in await mvms.console_log("idle1"), "console history did not follow the VM"


async def test_diskless_vm_moves_and_its_disk_verdict_is_none(mvms: LabVms) -> None:
    await boot(mvms, "nodisk1", "esx-a2", "memory:10MB/s@32M", memory=256 * MiB, disk=None)
    m = await mvms.relocate("nodisk1", "esx-b1")
    r = report_of(m)
    assert m.ok and r.result == "succeeded", r.error
    assert [p.name for p in r.phases] == HAPPY          # nothing on a disk to lose: committed
    assert r.integrity.memory == "verified" and r.integrity.guest_running
    assert r.integrity.disk == "none"            # its own word: neither "verified" nor "unverified"
    assert await where(mvms, "nodisk1") == {"esx-b1": "running"}


async def test_users_own_guest_is_unverified_and_its_source_copy_kept_until_discarded(mvms: LabVms) -> None:
    """A guest brought by the user (its kernel and initrd from the content library, its own kernel command line,
    no testbed agent configured): migrated, disk compared, running checked, memory unverified, so the move is not
    committed: the source copy stays paused with its disk until the user discards it."""
    vm = await own_guest(mvms, "own1", "esx-a2", 256 * MiB, 128 * MiB, "console=ttyS0")
    await asyncio.sleep(3)
    disk = vm["disks"][0]
    m = await mvms.relocate("own1", "esx-b1")
    r = report_of(m)
    assert m.ok and m.task["verdict"] == "unverified", (m.task["status"], m.error)
    assert r.result == "unverified" and r.source_kept, (r.result, r.error)
    assert [p.name for p in r.phases][-2:] == ["verify", "unverified"]
    assert r.error and "not verified" in r.error and "no testbed agent" in r.error, r.error
    assert r.integrity.memory == "unverified" and r.integrity.guest_running
    assert r.integrity.disk == "verified"       # the guest does not write: the images are identical
    assert r.downtime_ms.observed is None       # no heartbeat: nothing observed, nothing invented
    w = await where(mvms, "own1")
    assert w.pop("esx-b1") == "running" and list(w) == ["esx-a2"] and w["esx-a2"] != "running", w
    assert (await mvms.get("own1"))["host"] == "esx-b1"    # the inventory follows the running VM
    kept = await mvms.client("vc-a").aget("/api/testbed/source-copies")
    assert [(c["vm"], c["host"]) for c in kept] == [("own1", "esx-a2")], kept
    assert await digest(mvms, "esx-a2", disk["datastore"], disk["file"])   # the kept disk is still there
    assert await mvms.discard_source("own1") == "esx-a2"
    assert await where(mvms, "own1") == {"esx-b1": "running"}
    assert await leftovers(mvms, "esx-a2", "own1") == []
    m = await mvms.relocate("own1", "esx-b2", accept_unverified=True)   # the user's word: commit unverified
    r = report_of(m)
    assert m.ok and r.result == "succeeded" and r.accepted_unverified and not r.source_kept, r.error
    assert await where(mvms, "own1") == {"esx-b2": "running"}


@pytest.mark.parametrize("guest", ["built-in", "own"])
async def test_a_corrupted_destination_disk_fails_the_move_and_keeps_the_source(mvms: LabVms, guest: str) -> None:
    """A block of the destination disk that the guest never writes is overwritten before the verdict: the move
    is FAILED (for the user's own guest too, not "unverified": the destination's record of what the guest wrote
    since its resume says it was not the guest), the VM runs on the destination, the source copy is kept paused
    with its disk unchanged, and discarding it afterwards leaves the destination alone.

    The block is written through the destination's NBD export once the mirror has copied the disk (the mirror
    re-copies only what the source dirties, so it stays wrong): after the resume the guest's disk device holds
    the only write permission on that image, so nothing but the guest could write it there."""
    name = f"bad-{guest}"
    if guest == "own":
        vm = await own_guest(mvms, name, "esx-a1", 256 * MiB, 256 * MiB, "console=ttyS0")
        await asyncio.sleep(3)
    else:
        vm = await boot(mvms, name, "esx-a1", "idle", memory=256 * MiB, disk=256 * MiB)
    disk = vm["disks"][0]
    before = await digest(mvms, "esx-a1", disk["datastore"], disk["file"])
    said: list[str] = []

    async def corrupt(held: dict[str, Any]) -> None:
        nbd = held["incoming"]["nbd"]
        ns = labctl.host(mvms.state, "esx-b1").netns  # type: ignore[attr-defined]
        p = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, "qemu-io", "-f", "raw", f"nbd://{nbd['host']}:{nbd['port']}/disk0",
            "-c", "write -P 0x5a 200M 64k", "-c", "flush",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await p.communicate()
        said.append(out.decode())
        assert p.returncode == 0, said
    m = await mvms.relocate(name, "esx-b1", breakpoints={"memory-precopy:started": corrupt})
    r = report_of(m)
    print(f"\nqemu-io: {said}; {r.integrity.details}")
    assert not m.ok and r.result == "failed" and r.source_kept, (r.result, r.error)
    assert [p.name for p in r.phases][-2:] == ["verify", "failed"]
    assert r.integrity.disk == "failed", r.integrity.details
    assert r.integrity.memory == ("verified" if guest == "built-in" else "unverified"), r.integrity.details
    why = "writes nothing" if guest == "built-in" else "where the guest did not write after the resume"
    assert r.error and "differ" in r.error and "first at 200 MiB" in r.error and why in r.error, r.error
    assert "runs there" in m.error and "kept (paused) for inspection" in m.error, m.error
    w = await where(mvms, name)
    assert w.pop("esx-b1") == "running" and list(w) == ["esx-a1"] and w["esx-a1"] != "running", w
    assert await digest(mvms, "esx-a1", disk["datastore"], disk["file"]) == before   # the source's disk untouched
    assert (await mvms.get(name))["host"] == "esx-b1"
    assert await mvms.discard_source(name) == "esx-a1"
    assert await where(mvms, name) == {"esx-b1": "running"}


async def test_a_users_guest_writing_its_disk_gets_a_real_disk_verdict(mvms: LabVms) -> None:
    """The user's own guest writes its disk during and after the move; no block ring is consulted (it is not
    the built-in guest): the destination's record of the chunks written since the resume explains every
    difference, so the disk is verified, where it used to be "unverified"."""
    await own_guest(mvms, "own-w", "esx-a2", 256 * MiB, 128 * MiB, "console=ttyS0 tb.vm=own-w tb.disk_rate=4000000")
    await asyncio.sleep(4)

    async def let_it_write(held: dict[str, Any]) -> None:
        # the verdict would otherwise read the disk within milliseconds of the resume: wait until the guest has
        # written 1 MiB there, as the destination's QEMU counts it (no fixed sleep: a slow guest takes longer)
        async with agent(mvms, "esx-b1") as a:
            async def written() -> int:
                stats = await a.call("vm.qmp", name="own-w", command="query-blockstats")
                return sum(int(d["stats"]["wr_bytes"]) for d in stats)
            start = await written()
            for _ in range(600):
                if await written() - start >= MiB:
                    return
                await asyncio.sleep(0.1)
        raise AssertionError("the guest wrote less than 1 MiB to its disk in 60 s after the resume")
    m = await mvms.relocate("own-w", "esx-b1", accept_unverified=True,   # memory: no agent
                            breakpoints={"verify": let_it_write})
    r = report_of(m)
    print(f"\n{r.integrity.details}")
    assert r.integrity.disk == "verified", r.integrity.details
    assert any("all where the guest wrote after the resume" in d for d in r.integrity.details), \
        f"the guest did not write after the resume: {r.integrity.details}"
    assert r.integrity.memory == "unverified" and r.result == "succeeded" and r.accepted_unverified and m.ok


async def test_corrupted_memory_on_the_destination_fails_the_move_and_keeps_the_source(mvms: LabVms) -> None:
    """A byte of the guest's working set flipped in the destination's RAM while the source waits at
    pre-switchover (the idle working set is never dirtied, so no later page overwrites it): the guest's own
    verification after the resume finds it, the move is FAILED, the source copy kept paused."""
    await boot(mvms, "badmem1", "esx-a1", "idle", memory=256 * MiB, disk=None)
    found = re.search(r"TBAGENT wss page=1 gpa=0x([0-9a-f]+)", await mvms.console_log("badmem1"))
    assert found, "the agent never printed its working set's address"
    flipped: list[dict[str, str]] = []

    async def corrupt(held: dict[str, Any]) -> None:
        async with agent(mvms, "esx-b1") as a:
            flipped.append(await a.call("vm.corrupt_memory", name="badmem1", gpa=int(found.group(1), 16) + 0x123))
    m = await mvms.relocate("badmem1", "esx-b1", breakpoints={"switchover:held": corrupt})
    r = report_of(m)
    assert flipped and flipped[0]["before"] != flipped[0]["after"], flipped
    assert not m.ok and r.result == "failed" and r.source_kept, (r.result, r.error)
    assert [p.name for p in r.phases][-2:] == ["verify", "failed"]
    assert r.integrity.memory == "failed" and r.integrity.disk == "none", r.integrity.details
    assert r.error and "bad memory pages after the move" in r.error, r.error
    w = await where(mvms, "badmem1")
    assert w.pop("esx-b1") == "running" and list(w) == ["esx-a1"] and w["esx-a1"] != "running", w
    assert await mvms.discard_source("badmem1") == "esx-a1"
    assert await where(mvms, "badmem1") == {"esx-b1": "running"}


async def test_disk_writing_vm_moves_with_its_blocks(mvms: LabVms) -> None:
    await boot(mvms, "disk1", "esx-a2", "disk:5MB/s")
    r = assert_moved(await mvms.relocate("disk1", "esx-b1", streams=2), "esx-b1")
    assert r.streams == 2


async def test_busy_vm_converges_with_auto_converge(mvms: LabVms, mlab: str) -> None:
    """Dirtying ~1.5x faster than the link sends: auto-converge must throttle, and the move must converge."""
    await boot(mvms, "busy1", "esx-a1", "memory:45MB/s@48M", memory=256 * MiB, disk=256 * MiB)
    labctl.set_link(mlab, change_bandwidth=True, bandwidth_bps=30 * MiB)
    try:
        m = await mvms.relocate("busy1", "esx-b1", converge="auto-converge", downtime_limit_ms=300,
                                completion_timeout_s=180)
    finally:
        labctl.set_link(mlab, change_bandwidth=True, bandwidth_bps=100 * MiB)
    r = assert_moved(m, "esx-b1")
    # QEMU throttles only when the guest dirtied more than half of what it sent: proof it outpaced the link
    assert max(x.throttle_pct for x in r.rounds) > 0, "auto-converge never engaged"


async def test_ping_pong_keeps_integrity(mvms: LabVms) -> None:
    """Across the vCenters and back, and within one: the VM belongs to whichever vCenter holds its host."""
    await boot(mvms, "pong1", "esx-a1", "memory:20MB/s@64M,disk:1MB/s")
    for dest in ("esx-b1", "esx-a1", "esx-b1", "esx-a2"):
        assert_moved(await mvms.relocate("pong1", dest, downtime_limit_ms=100), dest)
        assert (await mvms.find("pong1"))[0] == mvms.vcenter_of_host(dest)
    assert await where(mvms, "pong1") == {"esx-a2": "running"}


# --- rollback ---------------------------------------------------------------------------------------

# the destination QEMU killed: its agent's exit event or the source's failed migration, whichever comes first
DEST_DIED = (r"the destination QEMU on host esx-b1 \(vc-b\) exited|the destination reports: |"
             r"QEMU on the source \(host esx-a1 \(vc-a\)\) reports the migration failed|"
             r"lost the connection to the host agent on host esx-b1")


async def test_rollback_when_destination_dies_during_disk_sync(mvms: LabVms) -> None:
    # 256 MiB of data in the disk: its copy takes seconds, so the kill lands while it runs
    await rollback_case(mvms, "rb-disk", "esx-b1", "disk-sync",
                        r"disk mirror mirror-disk0 to host esx-b1 \(vc-b\) stopped before it was ready",
                        breakpoints={"disk-sync:mirror-started": kill_destination(mvms, "rb-disk", "esx-b1")},
                        prefill_mib=256)


async def test_rollback_when_destination_dies_during_precopy(mvms: LabVms) -> None:
    await rollback_case(mvms, "rb-mem", "esx-b1", "memory-precopy", DEST_DIED,
                        breakpoints={"memory-precopy:started": kill_destination(mvms, "rb-mem", "esx-b1")})


async def test_rollback_when_destination_dies_at_switchover(mvms: LabVms) -> None:
    await rollback_case(mvms, "rb-switch", "esx-b1", "switchover", DEST_DIED,
                        breakpoints={"switchover:held": kill_destination(mvms, "rb-switch", "esx-b1")})


async def test_rollback_when_the_vmotion_link_is_cut_during_precopy(mvms: LabVms, mlab: str) -> None:
    """The link between the sites (vMotion and management alike) is cut as pre-copy starts: the move stalls and
    rolls back, the VM keeps running on the source. Neither the engine nor vc-a can reach esx-b1 or vc-b while the
    link is down, so vc-a keeps asking vc-b to abort: once the link is back, vc-b removes the placeholder, the
    incoming QEMU and its disk by itself, with no manual step."""
    async def cut(held: dict[str, Any]) -> None:
        await asyncio.to_thread(labctl.set_link, mlab, up=False)

    async def restore() -> None:
        await asyncio.to_thread(labctl.set_link, mlab, up=True)

    m = await rollback_case(mvms, "rb-cut", "esx-b1", "memory-precopy", "stalled|no progress",
                            breakpoints={"memory-precopy:started": cut}, workload="memory:60MB/s@64M",
                            stall_timeout_s=5.0, heal=restore, dest_settle_s=90)
    assert any("asked again in the background" in n for n in m.task["notes"]), m.task["notes"]


async def test_a_destination_datastore_too_small_is_refused_in_the_prechecks(mvms: LabVms) -> None:
    """The destination's datastore cannot hold the disk: the move is refused before anything is sent, with the
    datastore named; the VM keeps running where it was."""
    vm = await boot(mvms, "rb-full", "esx-a1", "idle")
    disk = vm["disks"][0]
    before = await digest(mvms, "esx-a1", disk["datastore"], disk["file"])
    m = await mvms.relocate("rb-full", "esx-b2")
    assert not m.ok and m.report is None, "no engine run after a failed precheck"
    assert "small-b2" in m.error and "free" in m.error, m.error
    failed = [c["name"] for c in m.task["prechecks"] if c["status"] == "error"]
    assert failed == ["datastore-space"], m.task["prechecks"]
    assert await where(mvms, "rb-full") == {"esx-a1": "running"}
    assert await digest(mvms, "esx-a1", disk["datastore"], disk["file"]) == before
    assert await leftovers(mvms, "esx-b2", "rb-full") == []
