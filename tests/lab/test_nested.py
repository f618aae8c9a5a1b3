"""Nested hosts: L1 VMs booted from the host image through libvirt, added to the vCenters like netns hosts,
with L2 guests inside them moved across vCenters (TCG inside TCG here).

- ``test_nested_smoke`` (default run): site A's host is nested, site B's a namespace; the L1 VM boots,
  is added to vc-a, and its agent starts an L2 guest from the host's own copy of the guest image.
- ``test_nested_migration`` (slow): in the same lab a small L2 guest (128 MiB, no disk) boots inside the
  L1 VM and is relocated from vc-a to vc-b with its memory verified.
- ``test_nested_full`` (slow): both hosts nested; a guest with a disk and a memory workload moves
  A -> B and back, integrity verified both ways.

Both print what they measured (L1 boot, L2 boot, engine time, downtime). They skip with the reason
when the host image is not built (`make host-image`) or libvirtd is missing.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import labctl
from testbed.errors import TestbedError
from testbed.lab import builder
from testbed.lab import observer as obs
from testbed.lab.topology import HostSpec, SiteSpec, Topology, VCenterSpec
from testbed.vcenter import deploy

from ..conftest import unique_lab_name

pytestmark = pytest.mark.lab


def _skip_reason() -> str | None:
    from testbed.hosts import nested
    try:
        nested.check_host_image()
    except TestbedError as err:
        return str(err)
    if shutil.which("unshare") is None or not Path("/usr/sbin/libvirtd").exists():
        return "libvirtd is not installed; run `make setup`"
    return None


def nested_topology(name: str, both: bool) -> Topology:
    def site(letter: str, kind: str) -> SiteSpec:
        vc = VCenterSpec(name=f"vc-{letter}", sso_domain=f"vsphere-{letter}.local")
        return SiteSpec(name=f"site-{letter}", vcenter=vc,
                        hosts=(HostSpec(name=f"esx-{letter}1", kind=kind, l1_memory_mib=1536),))  # type: ignore[arg-type]
    return Topology(name=name, sites=(site("a", "nested"), site("b", "nested" if both else "netns")))


def _up(both: bool) -> Iterator[tuple[str, dict[str, float]]]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    name = unique_lab_name()
    t0 = time.monotonic()
    try:
        timings = asyncio.run(deploy.up(nested_topology(name, both)))
    except BaseException:
        if builder.LabPaths(name).dir.exists():
            labctl.down(name)
        raise
    timings["lab_up_s"] = time.monotonic() - t0
    try:
        yield name, timings
    finally:
        labctl.down(name)


def create_and_boot(lab: str, vm: str, host: str, memory: str, disk: str | None, workload: str) -> float:
    """Create ``vm`` through its host's vCenter; seconds until its first heartbeat at the observer."""
    body: dict[str, Any] = {"name": vm, "placement": {"host": host}, "memory": memory, "workload": workload}
    if disk:
        body["disk"] = disk
    vc = "vc-a" if host.startswith("esx-a") else "vc-b"
    t0 = time.monotonic()
    with deploy.client(lab, vc) as c:
        c.post("/api/vcenter/vm", body)
    first = asyncio.run(obs.first_heartbeat(builder.LabPaths(lab).observer_socket, vm, since_s=t0, timeout_s=1800))
    assert first is not None, f"L2 guest {vm} on {host} sent no heartbeat within 1800 s"
    return first


def relocate(lab: str, vm: str, src_vc: str, dst_vc: str, dst_host: str) -> dict[str, Any]:
    cfg = deploy.config_of(lab, dst_vc)
    spec = {"placement": {"host": dst_host},
            "destination_vcenter": deploy.destination_vcenter(cfg)}
    with deploy.client(lab, src_vc) as c:
        tid = c.post(f"/api/vcenter/vm/{vm}", {"spec": spec}, params={"action": "relocate"})["task"]
        return c.wait_task(tid, timeout_s=900)


def assert_moved(t: dict[str, Any], dest: str, disk: bool) -> dict[str, Any]:
    assert t["status"] == "SUCCEEDED", t["error"]
    r = t["result"]
    assert r["destination"]["host"] == dest
    assert r["integrity"]["memory"] == "verified" and r["integrity"]["guest_running"], r["integrity"]
    if disk:
        assert r["integrity"]["disk"] == "verified", r["integrity"]
    return dict(r)


def report(capsys: pytest.CaptureFixture[str], what: str, **figures: object) -> None:
    with capsys.disabled():
        print(f"\n{what}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in figures.items()))


@pytest.fixture(scope="module")
def mixed_lab(lab_env: Path) -> Iterator[tuple[str, dict[str, float]]]:
    yield from _up(both=False)


@pytest.fixture(scope="module")
def nested_lab(lab_env: Path) -> Iterator[tuple[str, dict[str, float]]]:
    yield from _up(both=True)


def test_nested_smoke(mixed_lab: tuple[str, dict[str, float]], capsys: pytest.CaptureFixture[str]) -> None:
    """The nested host boots, is added to vc-a, and its agent starts an L2 guest from the host's own copy
    of the guest image. (No L2 boot or move here: TCG inside TCG boots an L2 kernel in many minutes on
    this machine; that is test_nested_migration's job, marked slow.)"""
    lab, timings = mixed_lab
    st = asyncio.run(labctl.status(lab, check_agents=True))
    kinds = {h["name"]: (h["kind"], h["state"]) for h in st["hosts"]}
    assert kinds["esx-a1"] == ("nested", "running"), kinds
    with deploy.client(lab, "vc-a") as c:
        hosts = {h["name"]: h for h in c.get("/api/vcenter/host")}
        assert "esx-a1" in hosts, hosts
        t0 = time.monotonic()
        c.post("/api/vcenter/vm", {"name": "l2s", "placement": {"host": "esx-a1"}, "memory": "128M"})
        create_s = time.monotonic() - t0
    state = builder.load_state(lab)

    async def on_host() -> list[dict[str, Any]]:
        async with await labctl.host(state, "esx-a1").agent() as agent:
            return list(await agent.call("vm.list"))
    vms = {v["name"]: v for v in asyncio.run(on_host())}
    assert vms["l2s"]["state"] == "running", vms
    with deploy.client(lab, "vc-a") as c:
        c.post("/api/vcenter/vm/l2s/power", {}, params={"action": "stop"})
        c.delete("/api/vcenter/vm/l2s")
    report(capsys, "nested smoke (L1 esx-a1 in vc-a, netns esx-b1 in vc-b)", lab_up_s=timings["lab_up_s"],
           l1_boot_s=timings.get("l1_boot_max_s", 0.0), l2_create_s=create_s)


@pytest.mark.slow
def test_nested_migration(mixed_lab: tuple[str, dict[str, float]], capsys: pytest.CaptureFixture[str]) -> None:
    """A small L2 guest (128 MiB, no disk) boots inside the L1 host and moves from vc-a to vc-b."""
    lab, timings = mixed_lab
    l2_boot = create_and_boot(lab, "l2a", "esx-a1", "128M", None, "memory:2MB/s@16M")
    t0 = time.monotonic()
    t = relocate(lab, "l2a", "vc-a", "vc-b", "esx-b1")
    task_s = time.monotonic() - t0
    r = assert_moved(t, "esx-b1", disk=False)
    report(capsys, "nested migration (L1 esx-a1 -> netns esx-b1)", lab_up_s=timings["lab_up_s"],
           l1_boot_s=timings.get("l1_boot_max_s", 0.0), l2_boot_s=l2_boot, relocate_task_s=task_s,
           engine_s=float(r["total_s"]), downtime_reported_ms=r["downtime_ms"]["reported"],
           downtime_observed_ms=r["downtime_ms"]["observed"], memory=r["integrity"]["memory"],
           source_clock_offset_s=r["clocks"]["source"]["offset_s"],
           source_clock_uncertainty_ms=r["clocks"]["source"]["uncertainty_s"] * 1000)


@pytest.mark.slow
def test_nested_full(nested_lab: tuple[str, dict[str, float]], capsys: pytest.CaptureFixture[str]) -> None:
    lab, timings = nested_lab
    l2_boot = create_and_boot(lab, "l2b", "esx-a1", "256M", "256M", "memory:5MB/s@64M,disk:1MB/s")
    time.sleep(2)
    t0 = time.monotonic()
    r1 = assert_moved(relocate(lab, "l2b", "vc-a", "vc-b", "esx-b1"), "esx-b1", disk=True)
    there = time.monotonic() - t0
    t0 = time.monotonic()
    r2 = assert_moved(relocate(lab, "l2b", "vc-b", "vc-a", "esx-a1"), "esx-a1", disk=True)
    back = time.monotonic() - t0
    report(capsys, "nested full (L1 esx-a1 <-> L1 esx-b1)", lab_up_s=timings["lab_up_s"],
           l1_boot_s=timings.get("l1_boot_max_s", 0.0), l2_boot_s=l2_boot,
           a_to_b_task_s=there, a_to_b_engine_s=float(r1["total_s"]),
           a_to_b_downtime_ms=f"{r1['downtime_ms']['reported']}/{r1['downtime_ms']['observed']}",
           b_to_a_task_s=back, b_to_a_engine_s=float(r2["total_s"]),
           b_to_a_downtime_ms=f"{r2['downtime_ms']['reported']}/{r2['downtime_ms']['observed']}")
