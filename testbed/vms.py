"""VM specs and their creation on a host (``build_vm_spec``, ``realize_on_host``: the vCenters use these), and
``VmManager``, the engine-level VM manager of a lab without vCenters.

``VmManager`` keeps a registry (``<labdir>/vms.json``: where each VM lives, its spec, its address, its hosts)
and reaches the hosts with the lab operator's key; the engine's lab tests, ``testbed bench``, the experiments
and ``benchmarks/`` use it. The CLI, the demo and scenarios go through the vCenters.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from testbed import labctl
from testbed.errors import Conflict, InputError, NotFound, TestbedError
from testbed.guest.workload import Workload, agent_cmdline, parse_workload
from testbed.hosts.agent import AgentClient, remove_vm
from testbed.lab import builder
from testbed.lab import observer as obs
from testbed.lab import topology as topo
from testbed.lab.state import StateFile
from testbed.migration.convergence import ConvergenceSettings, normalize
from testbed.migration.engine import Migration
from testbed.migration.report import MigrationReport
from testbed.migration.request import MigrationRequest, Place
from testbed.paths import GUEST_IMAGE_DIR, lab_dir
from testbed.qemu.spec import BootSpec, DiskSpec, NicSpec, VmSpec, check_vm_name

log = logging.getLogger("testbed.vms")


class Residence(BaseModel):
    host: str
    since_s: float


class VmRecord(BaseModel):
    name: str
    host: str
    spec: VmSpec
    ip: str | None = None                 # CIDR on the VM network
    workload: str = "idle"
    builtin_guest: bool = True
    created_s: float
    history: list[Residence] = Field(default_factory=list)
    # a move that was not verified (or failed after the switchover) left the source QEMU, paused, and its
    # disks here: host and spec of that copy, removed by ``discard_source`` or with the VM
    source_copy: tuple[str, VmSpec] | None = None


class Registry:
    def __init__(self, lab: str) -> None:
        self.path = lab_dir(lab) / "vms.json"
        self.sf = StateFile(lab_dir(lab))

    def load(self) -> dict[str, VmRecord]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {k: VmRecord.model_validate(v) for k, v in raw.items()}

    def save(self, vms: dict[str, VmRecord]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v.model_dump(mode="json") for k, v in vms.items()}, indent=1))
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, VmRecord]]:
        with self.sf.locked():
            vms = self.load()
            yield vms
            self.save(vms)


def _mac_for(lab: str, name: str) -> str:
    h = hashlib.sha256(f"{lab}/{name}".encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


def resolve_machine(facts: dict[str, Any], machine: str) -> str:
    """'q35' -> the host's concrete versioned type (pc-q35-10.0): migrations need it fixed."""
    return str(facts.get("machine_aliases", {}).get(machine, machine))


def check_vm_request(name: str, memory_bytes: int) -> None:
    check_vm_name(name)
    if memory_bytes < 64 * 1024**2:
        raise InputError(f"VM {name}: {memory_bytes // 1024**2} MiB of memory is too little",
                         hint="give at least 64M (the built-in guest wants 256M or more)")


def build_vm_spec(name: str, *, ip: str, mac: str, memory_bytes: int, disk_bytes: int | None, workload: str,
                  datastore: str, port_group: str, kernel: str | None = None, initrd: str | None = None,
                  append: str | None = None, image: str | None = None,
                  vcpus: int = 1, encrypted: bool = False) -> tuple[VmSpec, Workload, bool]:
    """The spec of a new VM: the built-in guest (kernel, initrd, agent command line) or the user's own.

    Returns the spec, its workload and whether it runs the built-in guest.
    """
    wl: Workload = parse_workload(workload)
    builtin = kernel is None and image is None
    if image is not None and kernel is not None:
        raise InputError("give either --image or --kernel/--initrd, not both")
    if not builtin and wl != Workload():
        raise InputError(f"VM {name}: a workload needs the built-in guest (its agent runs it)",
                         hint="drop --workload, or drop --kernel/--image")
    disks: list[DiskSpec] = []
    if disk_bytes:
        disks.append(DiskSpec(datastore=datastore, file=f"{name}-disk0.qcow2", size_bytes=disk_bytes,
                              encrypted=encrypted))
    elif encrypted:
        raise InputError(f"VM {name}: an encrypted VM needs a disk (--disk)")
    if builtin:
        k, i = GUEST_IMAGE_DIR / "vmlinuz", GUEST_IMAGE_DIR / "initrd.img"
        if not k.exists() or not i.exists():
            raise NotFound(f"the built-in guest image is not built ({GUEST_IMAGE_DIR})", hint="run `make image`")
        boot = BootSpec(kernel=str(k), initrd=str(i), builtin=True,
                        append=agent_cmdline(name, ip, f"{topo.OBSERVER_IP}:{topo.OBSERVER_PORT}",
                                             wl, memory_bytes, append or ""))
    elif kernel is not None:
        boot = BootSpec(kernel=str(Path(kernel).resolve()),
                        initrd=str(Path(initrd).resolve()) if initrd else None, append=append or "")
    else:
        if disk_bytes:
            raise InputError("with --image the image is the VM's disk; drop --disk")
        disks.append(DiskSpec(datastore=datastore, file=f"{name}-disk0.qcow2", size_bytes=1))
        boot = BootSpec(from_disk=True)
    spec = VmSpec(name=name, memory_bytes=memory_bytes, vcpus=vcpus, boot=boot, disks=tuple(disks),
                  nics=(NicSpec(port_group=port_group, mac=mac),))
    return spec, wl, builtin


async def realize_on_host(agent: AgentClient, spec: VmSpec, *, image: str | None = None,
                          image_format: str | None = None, start: bool = True) -> VmSpec:
    """Make ``spec`` real on the agent's host: its machine type fixed, its disks created (or imported from
    ``image``, a file in one of the host's import directories, of ``image_format``: None, the agent reads it).

    Returns the spec as it now is; starts the VM if asked. The caller undoes on failure.
    """
    facts = await agent.call("host.facts")
    disks = list(spec.disks)
    if image is not None:
        info = await agent.call("disk.import", datastore=disks[0].datastore, file=disks[0].file,
                                source=str(Path(image).resolve()), format=image_format)
        disks[0] = disks[0].model_copy(update={"size_bytes": info["size_bytes"]})
    else:
        for d in disks:
            await agent.call("disk.create", datastore=d.datastore, file=d.file, size_bytes=d.size_bytes,
                             encrypted=d.encrypted)
    spec = spec.model_copy(update={"machine": resolve_machine(facts, spec.machine), "disks": tuple(disks)})
    if start:
        await agent.call("vm.start", spec=spec.model_dump())
    return spec


class VmManager:
    def __init__(self, lab: str) -> None:
        self.lab = lab
        self.state = builder.load_state(lab)
        self.registry = Registry(lab)

    @contextlib.asynccontextmanager
    async def agent(self, host: str) -> AsyncIterator[AgentClient]:
        client = await labctl.host(self.state, host).agent()
        try:
            yield client
        finally:
            await client.close()

    def get(self, name: str) -> VmRecord:
        vms = self.registry.load()
        if name not in vms:
            raise NotFound(f"VM {name!r} does not exist in lab {self.lab}",
                           hint="`testbed vm list` shows the VMs" + (f": {', '.join(vms)}" if vms else ""))
        return vms[name]

    async def create(self, name: str, host: str, memory_bytes: int, disk_bytes: int | None, *,
                     workload: str = "idle", datastore: str | None = None, port_group: str | None = None,
                     kernel: str | None = None, initrd: str | None = None, append: str | None = None,
                     image: str | None = None, vcpus: int = 1, start: bool = True) -> VmRecord:
        """A VM on ``host``, reached with the lab operator's key. ``kernel``/``initrd``/``image`` are paths on the
        host (the lab operator's own), which its agent still checks: boot files only from the built-in guest's
        directory or a content library, images only from a content library (``HostConfig.import_dirs``)."""
        check_vm_request(name, memory_bytes)
        t = self.state.topology
        _, _, _, hspec = t.host(host)
        ds = datastore or topo.datastores_of(hspec)[0].name
        pg = t.port_group(port_group or t.port_groups[0].name)
        # Reserve the name and an address before touching any host.
        with self.registry.edit() as vms:
            if name in vms:
                raise Conflict(f"VM {name!r} already exists in lab {self.lab} (on host {vms[name].host})",
                               hint=f"choose another name or `testbed vm delete {name}` the old one")
            used = {v.ip for v in vms.values()}
            ip = next(a for a in map(topo.vm_address, range(65000)) if a not in used)
            spec, wl, builtin = build_vm_spec(
                name, ip=ip, mac=_mac_for(self.lab, name), memory_bytes=memory_bytes, disk_bytes=disk_bytes,
                workload=workload, datastore=ds, port_group=pg.name, kernel=kernel, initrd=initrd,
                append=append, image=image, vcpus=vcpus)
            record = VmRecord(
                name=name, host=host, ip=ip, workload=wl.describe(), builtin_guest=builtin,
                created_s=time.time(), history=[Residence(host=host, since_s=time.time())], spec=spec)
            vms[name] = record
        await self._observe(name, ip)
        try:
            async with self.agent(host) as agent:
                record.spec = await realize_on_host(agent, record.spec, image=image, start=False)
                with self.registry.edit() as vms:
                    vms[name] = record
                if start:
                    await agent.call("vm.start", spec=record.spec.model_dump())
        except BaseException:
            await self._undo_create(record)
            raise
        return record

    async def _undo_create(self, record: VmRecord) -> None:
        failed: list[str] = []
        try:
            async with self.agent(record.host) as agent:
                _, failed = await remove_vm(agent, record.spec)
        except (TimeoutError, TestbedError) as err:
            failed = [f"host {record.host}: {str(err).splitlines()[0]}"]
        if failed:
            log.warning("undoing the creation of VM %s: %s", record.name, "; ".join(failed))
        with self.registry.edit() as vms:
            vms.pop(record.name, None)
        await self._observe(record.name, None)

    async def _observe(self, name: str, address: str | None) -> None:
        """The VM's heartbeats bound to its address at the lab's observer (``None``: unbound)."""
        try:
            await obs.set_binding(labctl.observer_socket(self.lab), name, address)
        except obs.BINDING_ERRORS as err:
            log.warning("VM %s: heartbeats not %s at the observer of lab %s: %s", name,
                        "bound" if address else "unbound", self.lab, err)

    async def start(self, name: str) -> dict[str, Any]:
        r = self.get(name)
        async with self.agent(r.host) as agent:
            result: dict[str, Any] = await agent.call("vm.start", spec=r.spec.model_dump())
            return result

    async def stop(self, name: str) -> dict[str, Any]:
        r = self.get(name)
        async with self.agent(r.host) as agent:
            result: dict[str, Any] = await agent.call("vm.stop", name=name)
            return result

    async def delete(self, name: str) -> None:
        r = self.get(name)
        await self._remove_from(r.host, r.spec)
        if r.source_copy is not None:
            await self._remove_from(*r.source_copy)
        with self.registry.edit() as vms:
            vms.pop(name, None)
        await self._observe(name, None)

    async def discard_source(self, name: str) -> str:
        """Remove the source copy an unverified or failed move kept; which host it was on."""
        r = self.get(name)
        if r.source_copy is None:
            raise NotFound(f"VM {name} has no kept source copy", hint="only a move that was not verified keeps one")
        await self._remove_from(*r.source_copy)
        with self.registry.edit() as vms:
            vms[name].source_copy = None
        return r.source_copy[0]

    async def _remove_from(self, host: str, spec: VmSpec) -> None:
        async with self.agent(host) as agent:
            await remove_vm(agent, spec, finish_migration=True, strict=True)

    async def list(self) -> list[dict[str, Any]]:
        vms = self.registry.load()
        by_host: dict[str, list[VmRecord]] = {}
        for r in vms.values():
            by_host.setdefault(r.host, []).append(r)
        live: dict[str, dict[str, Any]] = {}
        errors: dict[str, str] = {}

        async def ask(host: str) -> None:
            try:
                async with self.agent(host) as agent:
                    for d in await agent.call("vm.list"):
                        live[d["name"]] = d
            except TestbedError as err:
                errors[host] = str(err)

        await asyncio.gather(*(ask(h) for h in by_host))
        hb = await self.heartbeats()
        out = []
        for r in sorted(vms.values(), key=lambda v: v.name):
            d = live.get(r.name)
            if r.host in errors:
                power = "unknown"
            elif d is None or d["state"] == "exited":
                power = "stopped"
            else:
                power = d.get("status", d["state"])
            h = hb.get(r.name) or {}
            out.append({
                "name": r.name, "host": r.host, "site": self.state.topology.host(r.host)[1].name,
                "power": power, "ip": r.ip, "memory_bytes": r.spec.memory_bytes,
                "disks": [d_.model_dump() for d_ in r.spec.disks], "workload": r.workload,
                "builtin_guest": r.builtin_guest, "pid": d.get("pid") if d else None,
                "heartbeat_age_s": h.get("age_s"), "heartbeats": h.get("count", 0),
                "error": errors.get(r.host),
            })
        return out

    async def heartbeats(self) -> dict[str, dict[str, Any]]:
        try:
            answer = await obs.query(labctl.observer_socket(self.lab), {"op": "vms"}, timeout_s=5)
        except (TimeoutError, OSError, RuntimeError):
            return {}
        now = answer["now_s"]
        return {n: {"count": v["count"], "age_s": round(now - v["last_s"], 3) if v["last_s"] else None}
                for n, v in answer["vms"].items()}

    async def heartbeat_stats(self, name: str, since_s: float | None = None,
                              gap_threshold_ms: float = 20) -> dict[str, Any]:
        self.get(name)
        return await obs.query(labctl.observer_socket(self.lab),
                               {"op": "stats", "vm": name, "since_s": since_s,
                                "gap_threshold_ms": gap_threshold_ms})

    async def console_log(self, name: str) -> str:
        """The whole console of the VM's life, across every host it lived on."""
        r = self.get(name)
        async with self.agent(r.host) as agent:
            text: str = (await agent.call("vm.console_log", name=name))["text"]
        return text

    async def migrate(self, name: str, to_host: str, *, to_datastore: str | None = None, streams: int = 1,
                      converge: str = "adaptive", bandwidth_bps: int | None = None, downtime_limit_ms: int = 100,
                      on_progress: Any = None, fault: Any = None, hold_switchover: bool = False,
                      completion_timeout_s: float | None = None, stall_timeout_s: float = 20.0,
                      allow_postcopy: bool = False, convergence: ConvergenceSettings | None = None,
                      postcopy_recovery_timeout_s: float = 120.0,
                      mirror_mode: str = "write-blocking",
                      mirror_granularity: int | None = None, disk_sync_timeout_s: float | None = None,
                      accept_unverified: bool = False,
                      agents: tuple[AgentClient, AgentClient] | None = None) -> MigrationReport:
        """Live-migrate ``name`` with its disks to ``to_host``; the registry follows wherever the VM runs after it
        (a move that was not verified, or failed after the switchover, keeps the source copy: ``source_copy``).

        ``converge``: auto-converge (alias auto) | sdps | postcopy | adaptive | off;
        ``completion_timeout_s`` None: per GiB of RAM (``ConvergenceSettings``); ``agents``: open connections
        to the source's and destination's agents, kept by the caller (None: the engine connects)."""
        r = self.get(name)
        if r.source_copy is not None:
            raise Conflict(f"VM {name}: the source copy of its last move is still kept on {r.source_copy[0]}",
                           hint=f"discard it first (VmManager.discard_source({name!r})) or delete the VM")
        t = self.state.topology
        _, ssite, _, _ = t.host(r.host)
        _, dsite, _, dspec = t.host(to_host)
        if streams < 1 or streams > 16:
            raise InputError(f"--streams {streams}: use 1 to 16 channels")
        if mirror_mode not in ("write-blocking", "background-throttled"):
            raise InputError(f"mirror mode {mirror_mode!r}: use write-blocking or background-throttled")
        ds = to_datastore or topo.datastores_of(dspec)[0].name
        req = MigrationRequest(
            spec=r.spec, observer_socket=labctl.observer_socket(self.lab), builtin_guest=r.builtin_guest,
            workload=parse_workload(r.workload), streams=streams,
            converge=normalize(converge),  # type: ignore[arg-type]
            bandwidth_bps=bandwidth_bps, allow_postcopy=allow_postcopy,
            convergence=convergence or ConvergenceSettings(),
            postcopy_recovery_timeout_s=postcopy_recovery_timeout_s,
            link_bandwidth_bps=self.state.link_bandwidth_bps, downtime_limit_ms=downtime_limit_ms,
            hold_switchover=hold_switchover, completion_timeout_s=completion_timeout_s,
            mirror_mode=mirror_mode, mirror_granularity=mirror_granularity, disk_sync_timeout_s=disk_sync_timeout_s,
            stall_timeout_s=stall_timeout_s, agents=agents, accept_unverified=accept_unverified,
            source=Place(labctl.host(self.state, r.host), ssite.vcenter.name,
                         r.spec.disks[0].datastore if r.spec.disks else topo.datastores_of(t.host(r.host)[3])[0].name),
            destination=Place(labctl.host(self.state, to_host), dsite.vcenter.name, ds))
        report = await Migration(req, on_progress=on_progress, fault=fault).run()
        if report.result in ("succeeded", "unverified") or report.source_kept:   # the VM runs on the destination
            with self.registry.edit() as vms:
                rec = vms[name]
                if report.source_kept:
                    rec.source_copy = (rec.host, rec.spec)
                rec.host = to_host
                rec.spec = rec.spec.moved_to(ds)
                rec.history.append(Residence(host=to_host, since_s=time.time()))
        return report

    async def wait_heartbeat(self, name: str, timeout_s: float = 30.0, since_s: float | None = None) -> float:
        """Seconds until the first heartbeat of ``name`` arrives after ``since_s``."""
        self.get(name)
        t0 = time.monotonic() if since_s is None else since_s
        first = await obs.first_heartbeat(labctl.observer_socket(self.lab), name, t0, timeout_s)
        if first is not None:
            return first
        raise TestbedError(f"no heartbeat from VM {name} within {timeout_s:.0f} s",
                           hint=f"see `testbed vm console-log {name}`")
