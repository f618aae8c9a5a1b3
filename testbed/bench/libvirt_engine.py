"""libvirt's own live migration, driven through libvirt-python: the baseline ``testbed bench`` compares with.

What a virtualization engineer would run instead of this testbed's engine is
``virsh migrate --live --p2p --copy-storage-all --auto-converge --parallel``; this module does
the same through the API (``virDomainMigrateToURI3``) between the libvirtds of two lab hosts
(``testbed.lab.libvirtd``), and measures the move the way the engine measures its own:
job statistics polled during the move (disk and memory phases, iterations), the completed job's
statistics (rounds, bytes, libvirt's downtime), lifecycle events for the instants of the
source's pause and the destination's resume, the source host's vMotion counter for bytes on
the wire, and the same guest heartbeats and disk digests for integrity
(``testbed.migration.integrity``).

The VM is the one the engine moves: the same ``VmSpec`` (kernel, initrd, command line, memory,
machine type, CPU model, virtio disk and NIC, TCG translation cache), made into domain XML,
its disk created by the host agent in the host's datastore, the NIC on the same port group bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from testbed.errors import TestbedError
from testbed.guest.workload import Workload
from testbed.hostd.config import HostConfig
from testbed.hostd.diskcheck import point_in_time
from testbed.hosts.agent import AgentClient
from testbed.lab import libvirtd
from testbed.lab import topology as topo
from testbed.migration import integrity
from testbed.migration.report import Integrity, Stalls
from testbed.qemu.cmdline import DOWNTIME_TRACE, downtime_checkpoints
from testbed.qemu.spec import VmSpec

QEMU = "/usr/bin/qemu-system-x86_64"

_events_started = threading.Lock()
_events_thread: threading.Thread | None = None


def _start_event_loop() -> None:
    """libvirt's default event loop in a daemon thread (lifecycle events); once per process, before connecting."""
    global _events_thread
    with _events_started:
        if _events_thread is not None:
            return
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)   # errors are raised, not printed
        libvirt.virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _events_thread = threading.Thread(target=loop, name="libvirt-events", daemon=True)
        _events_thread.start()


def domain_xml(spec: VmSpec, *, disk_dir: Path, console: Path, bridges: dict[str, str],
               tb_cache_mib: int = 128) -> str:
    """The domain XML of ``spec``: what ``testbed.qemu.cmdline`` gives QEMU, said the libvirt way."""
    if spec.boot.kernel is None:
        raise TestbedError(f"VM {spec.name}: the libvirt baseline boots the built-in guest's kernel only")
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "memory", unit="b").text = str(spec.memory_bytes)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine=spec.machine).text = "hvm"
    ET.SubElement(os_, "kernel").text = spec.boot.kernel
    if spec.boot.initrd:
        ET.SubElement(os_, "initrd").text = spec.boot.initrd
    ET.SubElement(os_, "cmdline").text = spec.boot.append
    feats = ET.SubElement(dom, "features")
    ET.SubElement(feats, "acpi")
    ET.SubElement(ET.SubElement(feats, "tcg"), "tb-cache", unit="MiB").text = str(tb_cache_mib)
    cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact", check="none")
    ET.SubElement(cpu, "model", fallback="forbid").text = spec.cpu_model
    ET.SubElement(dom, "clock", offset="utc")
    for ev, act in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(dom, ev).text = act
    devs = ET.SubElement(dom, "devices")
    ET.SubElement(devs, "emulator").text = QEMU
    for i, d in enumerate(spec.disks):
        if d.encrypted:
            raise TestbedError(f"VM {spec.name}: the libvirt baseline does not do encrypted disks")
        disk = ET.SubElement(devs, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=d.format, cache="writeback")
        ET.SubElement(disk, "source", file=str(disk_dir / d.file))
        ET.SubElement(disk, "target", dev=f"vd{chr(ord('a') + i)}", bus="virtio")
    for nic in spec.nics:
        iface = ET.SubElement(devs, "interface", type="bridge")
        ET.SubElement(iface, "source", bridge=bridges[nic.port_group])
        ET.SubElement(iface, "mac", address=nic.mac)
        ET.SubElement(iface, "model", type="virtio")
    serial = ET.SubElement(devs, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console), append="on")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devs, "controller", type="usb", model="none")
    ET.SubElement(devs, "memballoon", model="none")
    # QEMU's switchover checkpoints, as for the engine's QEMUs (testbed.qemu.cmdline): the same breakdown
    qcmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    for arg in ("-trace", f"enable={DOWNTIME_TRACE},file={trace_path(console)}", "-msg", "timestamp=on"):
        ET.SubElement(qcmd, f"{{{QEMU_NS}}}arg", value=arg)
    return ET.tostring(dom, encoding="unicode")


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)


def trace_path(console: Path) -> Path:
    """The domain's downtime trace, beside its console log on that host."""
    return console.with_name(console.name.removesuffix(".log") + ".downtime-trace.log")


@dataclass
class LibvirtHost:
    """One lab host as the baseline sees it: its libvirtd and its agent's view of its datastore."""

    lab: str
    name: str
    cfg: HostConfig
    vmotion_ip: str
    peer_uri: str

    def connect(self) -> libvirt.virConnect:
        _start_event_loop()
        try:
            return libvirt.open(libvirtd.local_uri(self.lab, self.name))
        except libvirt.libvirtError as err:
            raise TestbedError(f"cannot connect to libvirtd on host {self.name}: {err}",
                               hint=f"is it running? `testbed --lab {self.lab} lab status`; the bench starts it "
                                    "on the hosts it uses") from err

    def console(self, vm: str) -> Path:
        return Path(self.cfg.dir) / f"libvirt-{vm}-console.log"


@dataclass
class Settings:
    streams: int = 4
    auto_converge: bool = True
    downtime_limit_ms: int = 100
    synchronous_writes: bool = True      # new guest writes mirrored synchronously (as the engine's write-blocking)
    bandwidth_mib_s: int | None = None   # None: libvirt's default, unlimited (the link is the cap)
    detect_zeroes: bool = False


@dataclass
class Result:
    """One libvirt move, in the same terms as the engine's report."""

    ok: bool
    error: str | None = None
    total_s: float | None = None          # start -> guest resumed on the destination
    call_s: float | None = None           # the migrate call's own duration (ends after the source is cleaned up)
    disk_s: float | None = None           # start -> memory migration starts (NBD copy, setup)
    memory_s: float | None = None         # memory migration start -> resumed on the destination
    rounds: int | None = None
    reported_ms: float | None = None      # libvirt's own downtime figure
    observed_ms: float | None = None
    observed_naive_ms: float | None = None   # the largest raw heartbeat gap (the rule before sequence numbers)
    stalls: Stalls = field(default_factory=Stalls)
    wire_bytes: int | None = None
    memory_bytes: int | None = None
    disk_bytes: int | None = None
    integrity: Integrity = field(default_factory=Integrity)
    stats: dict[str, Any] = field(default_factory=dict)   # libvirt's completed-job statistics
    qemu_steps: dict[str, float] = field(default_factory=dict)   # QEMU's switchover checkpoints, s since start
    switchover: dict[str, float] = field(default_factory=dict)   # paused, resumed, heartbeat gap, s since start
    # the destination disk judged from its file, read under the running QEMU (the old way, now only evidence)
    file_read_verdicts: list[str] = field(default_factory=list)
    file_read_details: list[str] = field(default_factory=list)


def _qmp_sync(dom: Any, cmd: str, args: dict[str, Any] | None = None) -> Any:
    """A QMP command on a libvirt domain's QEMU (libvirt's passthrough; it marks the domain tainted)."""
    import libvirt_qemu
    msg = {"execute": cmd, **({"arguments": args} if args else {})}
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0))
    if "error" in reply:
        raise TestbedError(f"QMP {cmd} on domain {dom.name()}: {reply['error'].get('desc')}")
    return reply["return"]


def _qmp(dom: Any) -> Callable[[str, dict[str, Any] | None], Awaitable[Any]]:
    async def execute(cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await asyncio.to_thread(_qmp_sync, dom, cmd, args)
    return execute


def _disk_nodes(blocks: list[dict[str, Any]]) -> list[str]:
    """The block node of each of the domain's disks, in device order (libvirt's -blockdev format nodes)."""
    disks = sorted((b for b in blocks if b.get("inserted") and b.get("qdev", "").startswith(
        "/machine/peripheral/virtio-disk")), key=lambda b: str(b["qdev"]))
    return [str(b["inserted"]["node-name"]) for b in disks]


async def migrate(spec: VmSpec, src: LibvirtHost, dst: LibvirtHost, src_agent: AgentClient,
                  dst_agent: AgentClient, *, observer: Path, workload: Workload, settings: Settings) -> Result:
    """Move the running domain ``spec.name`` from ``src`` to ``dst`` with libvirt; measure and verify it.

    Disks go from the first datastore of one host to the first of the other (as the engine's default)."""
    res = Result(ok=False)
    sconn, dconn = await asyncio.gather(asyncio.to_thread(src.connect), asyncio.to_thread(dst.connect))
    marks: dict[str, float] = {}

    def on_src(conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        if dom.name() == spec.name and event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
            marks.setdefault("paused_s", time.monotonic())

    def on_dst(conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        if dom.name() == spec.name and event == libvirt.VIR_DOMAIN_EVENT_RESUMED:
            marks.setdefault("resumed_s", time.monotonic())

    cb_s = sconn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_src, None)
    cb_d = dconn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_dst, None)
    try:
        # From here it counts, as the engine's time does from its start: the destination's empty disk (libvirt
        # needs it to exist, or a storage pool to make it in), the parameters, the move.
        tx0 = (await src_agent.call("host.counters")).get("vmk1", {}).get("tx_bytes")
        t0 = time.monotonic()
        dom = sconn.lookupByName(spec.name)
        sds, dds = src.cfg.datastores[0].name, dst.cfg.datastores[0].name
        ddir = Path(dst.cfg.datastores[0].path)
        for d in spec.disks:
            await dst_agent.call("disk.create", datastore=dds, file=d.file, size_bytes=d.size_bytes)
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
        for s in root.iterfind("./devices/disk/source"):
            s.set("file", str(ddir / Path(s.get("file", "")).name))
        for s in root.iterfind("./devices/serial/source"):
            s.set("path", str(dst.console(spec.name)))
        for a in root.iterfind(f"./{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
            if a.get("value", "").startswith(f"enable={DOWNTIME_TRACE},file="):
                a.set("value", f"enable={DOWNTIME_TRACE},file={trace_path(dst.console(spec.name))}")
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{dst.vmotion_ip}",
            libvirt.VIR_MIGRATE_PARAM_DISKS_URI: f"tcp://{dst.vmotion_ip}",
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: ET.tostring(root, encoding="unicode"),
            libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: [f"vd{chr(ord('a') + i)}" for i in range(len(spec.disks))],
        }
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
        if spec.disks:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
            if settings.synchronous_writes:
                flags |= libvirt.VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES
            if settings.detect_zeroes:
                params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS_DETECT_ZEROES] = params[
                    libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS]
        if settings.auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if settings.streams > 1:
            flags |= libvirt.VIR_MIGRATE_PARALLEL
            params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = settings.streams
        if settings.bandwidth_mib_s:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = settings.bandwidth_mib_s
        dom.migrateSetMaxDowntime(settings.downtime_limit_ms, 0)
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    st = dom.jobStats()
                except libvirt.libvirtError:
                    return
                if st.get("memory_total", 0) and (st.get("memory_processed", 0) or st.get("memory_iteration", 0)):
                    marks.setdefault("memory_s", time.monotonic())
                stop.wait(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            await asyncio.to_thread(dom.migrateToURI3, dst.peer_uri, params, flags)
        except libvirt.libvirtError as err:
            res.error = f"libvirt migration of {spec.name} from {src.name} to {dst.name} failed: {err}"
            return res
        finally:
            stop.set()
            await asyncio.to_thread(poller.join)
        res.call_s = time.monotonic() - t0
        tx1 = (await src_agent.call("host.counters")).get("vmk1", {}).get("tx_bytes")
        if tx0 is not None and tx1 is not None:
            res.wire_bytes = int(tx1) - int(tx0)
        ddom = dconn.lookupByName(spec.name)
        st = ddom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        res.stats = dict(st)
        res.rounds = st.get("memory_iteration")
        res.reported_ms = st.get("downtime")
        res.memory_bytes = st.get("memory_processed")
        res.disk_bytes = st.get("disk_processed")
        for _ in range(50):   # the events come through libvirtd's connection: allow them a moment
            if "paused_s" in marks and "resumed_s" in marks:
                break
            await asyncio.sleep(0.1)
        if "paused_s" not in marks or "resumed_s" not in marks:
            res.error = f"no pause/resume events from libvirt for {spec.name} (saw {sorted(marks)})"
            return res
        paused, resumed = marks["paused_s"], marks["resumed_s"]
        wall = time.time() - time.monotonic()
        # each QEMU's own trace (the source's is the one that arrived in the run before: it appends, and the
        # last occurrence of a checkpoint is this move's); the lab's removal takes the files
        for f in (trace_path(src.console(spec.name)), trace_path(dst.console(spec.name))):
            with contextlib.suppress(FileNotFoundError):
                res.qemu_steps.update({k: round(v - t0, 4) for k, v in
                                       downtime_checkpoints(f.read_text(errors="replace"), wall).items()
                                       if v >= t0})
        res.switchover = {"paused_s": round(paused - t0, 4), "resumed_s": round(resumed - t0, 4)}
        mem0 = marks.get("memory_s", paused)
        res.total_s = resumed - t0
        res.disk_s = mem0 - t0
        res.memory_s = resumed - mem0
        integ = res.integrity
        hb0 = await integrity.heartbeat_before(observer, spec.name, paused)
        await integrity.guest_back(observer, spec.name, resumed)
        # The source image is inactive (its QEMU finished the migration): its file is read. The destination's
        # guest runs: read through its QEMU at one instant (fleecing over libvirt's QMP passthrough); the file
        # read under the running QEMU is kept beside it, as evidence of what such a read would have said.
        work = ddir / f".tb-verify-{spec.name}"
        work.mkdir(exist_ok=True)
        nodes = _disk_nodes(await asyncio.to_thread(_qmp_sync, ddom, "query-block"))
        digests = asyncio.gather(*(asyncio.gather(
            src_agent.call("disk.digest", datastore=sds, file=d.file, timeout_s=300),
            point_in_time(_qmp(ddom), nodes[i], work, f"domain {spec.name} on {dst.name}"),
            dst_agent.call("disk.digest", datastore=dds, file=d.file, timeout_s=300))
            for i, d in enumerate(spec.disks)))
        times = await integrity.check_guest(observer, spec.name, hb0, precopy_s=mem0, paused_s=paused,
                                            resumed_s=resumed, workload=workload, integ=integ)
        res.observed_ms, res.observed_naive_ms, res.stalls = times.observed_ms, times.naive_ms, times.stalls
        if times.gap_end_s is not None and times.gap_start_s is not None:
            res.switchover.update(heartbeat_gap_start_s=round(times.gap_start_s - t0, 4),
                                  heartbeat_gap_end_s=round(times.gap_end_s - t0, 4))
        verdicts: list[str] = []
        try:
            results = await digests
        except TestbedError as err:
            integ.details.append(f"disks unverified: could not compare ({err.message})")
            results, verdicts = [], ["unverified"]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for d, (a, b, live_file) in zip(spec.disks, results, strict=True):
            verdicts.append(integrity.judge_disk(d.file, a, b, builtin_guest=True, workload=workload, hb0=hb0,
                                                 details=integ.details))
            said: list[str] = []
            res.file_read_verdicts.append(integrity.judge_disk(d.file, a, live_file, builtin_guest=True,
                                                               workload=workload, hb0=hb0, details=said))
            res.file_read_details += said
        integ.disk = ("none" if not verdicts else "failed" if "failed" in verdicts else
                      "unverified" if "unverified" in verdicts else "verified")
        if not (await asyncio.to_thread(ddom.isActive)):
            integ.details.append(f"the domain is not running on {dst.name}")
            integ.guest_running = False
        res.ok = integrity.verdict(integ) == "verified"
        # the source keeps its copy of the disk (libvirt leaves it): remove it, as the engine's commit does
        for d in spec.disks:
            await src_agent.call("disk.delete", datastore=sds, file=d.file)
        return res
    finally:
        for conn, cb in ((sconn, cb_s), (dconn, cb_d)):
            try:
                conn.domainEventDeregisterAny(cb)
                conn.close()
            except libvirt.libvirtError:
                pass


def topology_host(t: topo.Topology, cfg: HostConfig, lab: str) -> LibvirtHost:
    return LibvirtHost(lab=lab, name=cfg.name, cfg=cfg, vmotion_ip=cfg.vmotion_address,
                       peer_uri=libvirtd.peer_uri(t, cfg.name))


__all__ = ["LibvirtHost", "Result", "Settings", "domain_xml", "migrate", "topology_host"]
