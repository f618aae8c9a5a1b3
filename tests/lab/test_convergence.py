"""The convergence controllers on the embedded lab, every move a relocate through the vCenters: a guest dirtying
twice as fast as the link sends moves with every mode, integrity verified; the completion policy aborts and rolls
back when no fallback is allowed; a post-copy whose link is cut recovers when the link comes back, and is reported
FAILED (never as a success, never rolled back onto a source that lacks the guest's newest pages) when it does not."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import labctl
from testbed.errors import TestbedError
from testbed.lab.topology import default_topology
from testbed.vcenter import deploy
from testbed.vcenter.labvms import LabVms

from ..conftest import unique_lab_name
from .labkit import HAPPY, MiB, agent, assert_on_source_only, boot, digest, lab_vms, report_of, where

pytestmark = pytest.mark.lab

LINK = 30 * MiB
BUSY = "memory:60MB/s@48M"       # twice what the link sends


@pytest.fixture(scope="module")
def clab(lab_env: Path) -> Iterator[str]:
    name = unique_lab_name()
    try:
        asyncio.run(deploy.up(default_topology(name)))
        labctl.set_link(name, change_bandwidth=True, bandwidth_bps=LINK)
        yield name
    finally:
        labctl.down(name)


@pytest.fixture
async def cvms(clab: str) -> AsyncIterator[LabVms]:
    async with lab_vms(clab) as m:
        yield m


async def busy_vm(m: LabVms, name: str, workload: str = BUSY, memory: int = 256 * MiB) -> dict[str, Any]:
    return await boot(m, name, "esx-a1", workload, memory=memory, disk=128 * MiB)


CPU_BOUND = BUSY + ",cpu-bound"   # the same rate per CPU-second the guest gets


@pytest.mark.parametrize("mode,workload", [("sdps", BUSY), ("sdps", CPU_BOUND), ("postcopy", BUSY),
                                           ("adaptive", BUSY)],
                         ids=["sdps-open-loop", "sdps-cpu-bound", "postcopy", "adaptive"])
async def test_busy_guest_moves_with_each_mode(cvms: LabVms, mode: str, workload: str) -> None:
    """Twice what the link sends, dirtied by the clock (open-loop) or per CPU-second: every mode ends in a
    verified move (adaptive here without post-copy: SDPS alone must bring it under the link's rate)."""
    name = f"cv-{mode[:5]}{'-c' if 'cpu' in workload else ''}"
    await busy_vm(cvms, name, workload)
    m = await cvms.relocate(name, "esx-b1", converge=mode, downtime_limit_ms=100, completion_timeout_s=150,
                            allow_postcopy=False)
    r = report_of(m)
    detail = f"{r.result}: {r.error}; {r.integrity.details}; decisions {r.decisions}"
    assert m.ok and r.result == "succeeded", detail
    assert [p.name for p in r.phases] == HAPPY
    assert r.integrity.memory == "verified" and r.integrity.disk == "verified" and r.integrity.guest_running, detail
    assert r.converge == mode
    assert await where(cvms, name) == {"esx-b1": "running"}
    stuns = [d.value or 0 for d in r.decisions if d.action == "stun"]
    if mode in ("sdps", "adaptive"):
        # the guest outpaces the link: SDPS must have stunned it, in slices, no deeper than its ceiling
        assert stuns and 0 < max(stuns) <= 99, detail
        assert any("ms slices" in d.detail for d in r.decisions if d.action == "stun"), detail
        assert max(x.throttle_pct for x in r.rounds) == 0, "QEMU's throttle must stay off"
        assert not any(d.action == "postcopy" for d in r.decisions), detail
    if mode == "postcopy":
        assert r.postcopy is not None and r.postcopy.completed_s is not None, detail
        assert any(d.action == "postcopy" for d in r.decisions)
    print(f"\n{mode} {workload}: {r.total_s:.1f} s, {len(r.rounds)} rounds, downtime {r.downtime_ms.reported}/"
          f"{r.downtime_ms.observed} ms, stall max {r.stalls_ms.max} ms, stun max {max(stuns, default=0)}%, "
          f"post-copy {r.postcopy}; decisions: "
          + "; ".join(f"r{d.round} {d.action} {'' if d.value is None else d.value}" for d in r.decisions))


@pytest.mark.parametrize("mode", [pytest.param("auto-converge", marks=pytest.mark.slow), "adaptive"])
async def test_completion_policy_aborts_and_rolls_back(cvms: LabVms, mode: str) -> None:
    """No fallback allowed, a guest rewriting its whole working set as fast as it can, SDPS limited to 5 %:
    auto-converge cannot converge within its 12 s completion timeout; adaptive, given 150 s, must not wait for
    it: once SDPS measures that it cannot slow the guest enough and no downtime step would do, it aborts at
    once. Both roll back cleanly."""
    name = f"cp-{mode[:5]}"
    disk = (await busy_vm(cvms, name, workload="memory:10GB/s@64M"))["disks"][0]
    before = await digest(cvms, "esx-a1", disk["datastore"], disk["file"])
    t = time.monotonic()
    m = await cvms.relocate(name, "esx-b1", converge=mode, completion_timeout_s=12 if mode != "adaptive" else 150,
                            allow_postcopy=False, sdps_max_stun_pct=5)
    took = time.monotonic() - t
    r = report_of(m)
    assert not m.ok and r.result == "rolled_back", f"{r.result}: {r.error}"
    assert r.failed_phase == "memory-precopy"
    err = r.error or ""
    if mode == "adaptive":
        assert "pre-copy cannot converge: with SDPS at its ceiling (5% of each slice stunned)" in err, err
        assert "ms of downtime (at most 500 ms allowed); post-copy not allowed" in err, err
    else:
        assert "did not converge within the completion timeout of 12 s" in err, err
        assert "dirties" in err and "MB/s, the link sends" in err and "auto-converge" in err, err
    assert any(d.action == "abort" for d in r.decisions)
    # the relocate's prechecks (a second's dirty-rate sample) and admission come before the engine
    assert took < 60, f"the abort took {took:.0f} s"
    await assert_on_source_only(cvms, name, "esx-a1", "esx-b1", before)


async def cleanup_everywhere(m: LabVms, name: str) -> None:
    """A post-copy that lost its channel leaves a QEMU on both hosts that no vCenter can stop cleanly: the test
    removes them as an operator would, then the VM's records go through the vCenters (lab_vms' cleanup)."""
    for h in ("esx-a1", "esx-b1"):
        async with agent(m, h) as a:
            for call in ("vm.kill", "vm.remove"):
                with contextlib.suppress(TestbedError):
                    await a.call(call, name=name)
            for ds in (await a.call("host.facts"))["datastores"]:
                for d in ds["disks"]:
                    if name in d:
                        with contextlib.suppress(TestbedError):
                            await a.call("disk.delete", datastore=ds["name"], file=d)


async def test_postcopy_survives_a_link_cut_by_recovery(cvms: LabVms, clab: str) -> None:
    """The link goes down just after the guest started running on the destination, and comes back 4 s later:
    both sides pause (migrate-pause), the engine reconnects them (migrate-recover / migrate resume=true)."""
    name = "pc-cut"
    await busy_vm(cvms, name, workload="memory:60MB/s@128M")
    restore: list[asyncio.Task[None]] = []

    async def later() -> None:
        await asyncio.sleep(4)
        await asyncio.to_thread(labctl.set_link, clab, up=True)

    async def cut(held: dict[str, Any]) -> None:
        await asyncio.to_thread(labctl.set_link, clab, up=False)
        restore.append(asyncio.create_task(later()))

    try:
        m = await cvms.relocate(name, "esx-b1", converge="postcopy", stall_timeout_s=3, completion_timeout_s=150,
                                breakpoints={"postcopy:running": cut})
    finally:
        labctl.set_link(clab, up=True)
    r = report_of(m)
    detail = f"{r.result}: {r.error}; {r.integrity.details}; decisions {r.decisions}"
    assert restore, "post-copy never started: " + detail
    assert m.ok and r.result == "succeeded", detail
    assert r.postcopy is not None and r.postcopy.pauses >= 1 and r.postcopy.recoveries >= 1, detail
    assert [d.action for d in r.decisions if d.action.startswith("postcopy")][:3] == \
        ["postcopy", "postcopy-pause", "postcopy-recover"], detail
    assert r.integrity.memory == "verified" and r.integrity.disk == "verified", detail
    assert await where(cvms, name) == {"esx-b1": "running"}


@pytest.mark.slow
async def test_postcopy_with_a_link_that_stays_down_is_reported_failed(cvms: LabVms, clab: str) -> None:
    """No recovery possible: the report says FAILED, why, and that both QEMUs are kept; nothing is committed
    and nothing is rolled back onto a source that no longer has the guest's newest pages."""
    name = "pc-lost"
    await busy_vm(cvms, name, workload="memory:60MB/s@128M")

    async def cut(held: dict[str, Any]) -> None:
        await asyncio.to_thread(labctl.set_link, clab, up=False)

    try:
        m = await cvms.relocate(name, "esx-b1", converge="postcopy", stall_timeout_s=3, postcopy_recovery_timeout_s=6,
                                completion_timeout_s=150, breakpoints={"postcopy:running": cut})
        r = report_of(m)
        assert not m.ok and r.result == "failed", f"{r.result}: {r.error}"
        assert r.error and "cannot run on either" in r.error and "did not come back within 6 s" in r.error, r.error
        assert r.postcopy is not None and r.postcopy.pauses == 1 and r.postcopy.recoveries == 0
        assert set(await where(cvms, name, ("esx-a1", "esx-b1"))) == {"esx-a1", "esx-b1"}   # both kept
    finally:
        labctl.set_link(clab, up=True)
        await cleanup_everywhere(cvms, name)
