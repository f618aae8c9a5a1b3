"""What the benchmarks and the experiments share: a lab of their own with its two vCenters (taken down
whatever happens), a built-in guest created through its vCenter and waited for until it sends heartbeats, and
a move as a user makes it (a relocate through the VM's vCenter) with the machine's load recorded around it.

One control plane: every VM here is created, moved and deleted through a vCenter
(``testbed.vcenter.labvms.LabVms``); what a benchmark reads besides (the observer, a host's log, a probe
between two host namespaces) it only reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from testbed import labctl
from testbed.errors import NotFound, TestbedError
from testbed.lab import quality
from testbed.lab.topology import LinkSpec, Topology, default_topology
from testbed.migration.report import MigrationReport
from testbed.vcenter import deploy
from testbed.vcenter.labvms import LabVms, Move

MiB = 1024**2
PAIR = ("esx-a1", "esx-b1")       # site A (vc-a) and site B (vc-b) of the default topology: every move crosses
Log = Callable[[str], None]


def topology(lab: str, *, bandwidth_bps: int | None = None, mtu: int = 1500) -> Topology:
    """The default two-site lab (2 sites x 2 hosts, a vCenter each) with its site link capped at
    ``bandwidth_bps`` (None: uncapped) and the vMotion network's MTU."""
    return default_topology(lab).model_copy(update={"link": LinkSpec(bandwidth_bps=bandwidth_bps, mtu=mtu)})


@contextlib.asynccontextmanager
async def lab_up(t: Topology, log: Log) -> AsyncIterator[LabVms]:
    """Lab ``t`` up with its vCenters (each host added to its own, which starts its agent); its VMs through
    them. The lab is taken down on the way out, whatever happened (a lab that failed to come up removes what it
    made itself; one of the same name that was already up is left alone)."""
    t0 = time.monotonic()
    await deploy.up(t)
    try:
        log(f"lab {t.name} up with vCenters {', '.join(s.vcenter.name for s in t.sites)} in "
            f"{time.monotonic() - t0:.1f} s")
        async with LabVms(t.name) as vms:
            yield vms
    finally:
        await asyncio.to_thread(labctl.down, t.name)
        log(f"lab {t.name}: down")


async def boot(vms: LabVms, name: str, host: str, memory_bytes: int, disk_bytes: int | None, workload: str, *,
               settle_s: float = 3.0, timeout_s: float = 90.0) -> dict[str, Any]:
    """A built-in guest created on ``host`` by its vCenter, sending heartbeats, its workload given ``settle_s``
    to fill its working set. The VM as its vCenter shows it."""
    t0 = time.monotonic()
    vm = await vms.create(name, host, memory_bytes, disk_bytes, workload=workload)
    await vms.wait_heartbeat(name, since_s=t0, timeout_s=timeout_s)
    await asyncio.sleep(settle_s)
    return vm


async def remove(vms: LabVms, name: str, log: Log) -> None:
    """Delete VM ``name`` through its vCenter (and any source copy kept of it); a VM that is in no vCenter
    (its creation failed) is nothing to delete. A failure is said, not raised: the lab's teardown follows."""
    try:
        await vms.delete(name)
    except NotFound:
        pass
    except TestbedError as err:
        log(f"deleting VM {name} through its vCenter failed: {err} (the lab's teardown removes it)")


@contextlib.asynccontextmanager
async def booted(vms: LabVms, name: str, host: str, memory_bytes: int, disk_bytes: int | None, workload: str,
                 log: Log, **kw: Any) -> AsyncIterator[dict[str, Any]]:
    """``boot`` for the block; the VM deleted after it, whatever happened."""
    try:
        yield await boot(vms, name, host, memory_bytes, disk_bytes, workload, **kw)
    finally:
        await remove(vms, name, log)


async def where(vms: LabVms, name: str) -> str:
    """The host VM ``name`` runs on, as its vCenter says."""
    return str((await vms.get(name))["host"])


def other(host: str, pair: tuple[str, str] = PAIR) -> str:
    """The other host of the pair: moves go back and forth between them."""
    return pair[1] if host == pair[0] else pair[0]


def load_text(q: dict[str, Any]) -> str:
    """A ``quality.Watch`` summary as one line: the 1-minute load at the start -> end (its maximum, CPU steal),
    and LOADED when it rose above what the machine has CPUs for."""
    return (f"{q['load_at_start'][0]:.2f}->{q['load_at_end'][0]:.2f} (max {q['max_load_1m']:.2f}, steal "
            f"{q['steal_pct']:g}%)" + (" LOADED" if q["loaded"] else ""))


@dataclass
class Measured:
    """One move: the relocate task and the engine's report (``Move``), from where to where, and how busy the
    machine was while it ran (``quality.Watch.summary()``)."""
    move: Move
    source: str
    destination: str
    quality: dict[str, Any]
    discarded_source: bool = False     # an unverified move's kept source copy was removed after it

    @property
    def report(self) -> MigrationReport | None:
        return self.move.report

    @property
    def result(self) -> str:
        """The engine's result, or ``failed`` when the task failed all the same (prechecks, admission,
        registration) or never got to the engine."""
        r = self.move.report
        if r is None or (r.result in ("succeeded", "unverified") and not self.move.ok):
            return "failed"
        return r.result

    @property
    def error(self) -> str | None:
        r = self.move.report
        return (r.error if r is not None and r.error else None) or self.move.error or None

    @property
    def load(self) -> str:
        return load_text(self.quality)

    @property
    def loaded(self) -> bool:
        return bool(self.quality["loaded"])


async def move(vms: LabVms, name: str, to_host: str, *, keep_source: bool = False, **options: Any) -> Measured:
    """Relocate VM ``name`` to ``to_host`` through its vCenter with the relocate ``options`` as the API names
    them (``streams``, ``converge``, ``downtime_limit_ms``, ...), the load watched while it runs. A source copy
    the move kept (unverified) is removed afterwards unless ``keep_source``: the next move needs it gone."""
    source = await where(vms, name)
    with quality.Watch() as watch:
        m = await vms.relocate(name, to_host, **options)
    out = Measured(move=m, source=source, destination=to_host, quality=watch.summary())
    if m.report is not None and m.report.source_kept and not keep_source:
        await vms.discard_source(name)
        out.discarded_source = True
    return out


def engine_start(m: Move) -> float | None:
    """When the engine started, on this process's ``time.monotonic()`` clock (the observer's on this machine):
    the task's timeline has the wall-clock time each engine phase began (the vCenter's clock, this machine's),
    the report the same phase's start on the engine's clock (seconds since its start). None without either."""
    if m.report is None:
        return None
    began: dict[str, float] = {}
    for e in m.task.get("timeline", []):
        began.setdefault(e["phase"], float(e["at_s"]))
    for p in m.report.phases:
        if p.name in began:
            return began[p.name] - p.start_s - (time.time() - time.monotonic())
    return None
