"""The host agent daemon: JSON-lines RPC on a UNIX socket, one per host.

``HostAgent`` holds the methods (``vm.*``, ``disk.*``, ``datastore.*``,
``host.*``, ``net.*``, ``migration.*``, ``events.*``), each registered under its
protocol name with ``@method``; ``serve`` accepts connections and dispatches
requests concurrently; events from every VM's QMP go to the connections that
subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import platform
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from testbed.errors import Conflict, InputError, NotFound, QemuError
from testbed.hostd import protocol
from testbed.hostd.config import HostConfig
from testbed.hostd.datastore import Datastores
from testbed.hostd.migration import DestinationRole, SourceRole, reachable
from testbed.hostd.vm import VmProcess
from testbed.qemu.cmdline import VmPaths
from testbed.qemu.spec import VmSpec, check_vm_name

log = logging.getLogger("testbed.hostd")

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])
METHODS: dict[str, str] = {}   # the agent protocol's method names -> HostAgent's handlers


def method(name: str) -> Callable[[Handler], Handler]:
    """A ``HostAgent`` handler of the protocol method ``name`` (``vm.start``): only these can be called."""
    def register(fn: Handler) -> Handler:
        if name in METHODS:
            raise ValueError(f"agent method {name} defined twice ({METHODS[name]}, {fn.__name__})")
        METHODS[name] = fn.__name__
        return fn
    return register


class Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.subscribed: set[str] | None = None   # None: no events; empty set: all VMs
        self._lock = asyncio.Lock()

    async def send(self, msg: dict[str, Any]) -> None:
        async with self._lock:
            self.writer.write(protocol.encode(msg))
            await self.writer.drain()


class HostAgent:
    def __init__(self, cfg: HostConfig) -> None:
        self.cfg = cfg
        self.datastores = Datastores(cfg)
        self.vms: dict[str, VmProcess] = {}
        self.sources: dict[str, SourceRole] = {}
        self.destinations: dict[str, DestinationRole] = {}
        self.connections: set[Connection] = set()
        self._facts_cache: dict[str, Any] | None = None
        self.probes: dict[str, dict[int, int]] = {}
        self._background: set[asyncio.Task[None]] = set()
        cfg.vms_dir.mkdir(parents=True, exist_ok=True)

    async def _static_facts(self) -> dict[str, Any]:
        return _restrict_machines(await _static_facts(self.cfg.qemu_binary), self.cfg.machine_types)

    async def warm_up(self) -> None:
        """Gather the static facts (three QEMU queries) at start, not when the vCenter first asks."""
        with contextlib.suppress(Exception):
            self._facts_cache = await self._static_facts()

    # --- events --------------------------------------------------------------
    def _emitter(self, vm: str) -> Any:
        def emit(kind: str, data: dict[str, Any]) -> None:
            msg = {"event": kind, "vm": vm, "host": self.cfg.name, "data": data}
            for conn in list(self.connections):
                if conn.subscribed is not None and (not conn.subscribed or vm in conn.subscribed):
                    asyncio.ensure_future(self._send_quietly(conn, msg))
        return emit

    async def _send_quietly(self, conn: Connection, msg: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await conn.send(msg)

    # --- host ------------------------------------------------------------------
    @method("host.ping")
    async def m_host_ping(self, conn: Connection) -> dict[str, Any]:
        return {"host": self.cfg.name, "pid": os.getpid(), "time_s": time.time()}

    @method("host.facts")
    async def m_host_facts(self, conn: Connection) -> dict[str, Any]:
        if self._facts_cache is None:
            self._facts_cache = await self._static_facts()
        mem_total = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                mem_total = int(line.split()[1]) * 1024
        return {
            "name": self.cfg.name, **self._facts_cache,
            "accel": self.cfg.accel, "accel_reason": self.cfg.accel_reason,
            "cpus": os.cpu_count(), "memory_available_bytes": mem_total,
            "license": self.cfg.license,
            "datastores": await self.datastores.list(),
            "port_groups": [{"name": n, "bridge": b} for n, b in self.cfg.port_groups.items()],
            "mgmt_address": self.cfg.mgmt_address, "vmotion_address": self.cfg.vmotion_address,
            "vms": sorted(self.vms),
        }

    @method("host.counters")
    async def m_host_counters(self, conn: Connection) -> dict[str, dict[str, int]]:
        """Byte counters of the host's interfaces (vmk1 is the vMotion network)."""
        out = {}
        for dev in sorted(Path("/sys/class/net").iterdir()):
            stats = dev / "statistics"
            with contextlib.suppress(OSError):
                out[dev.name] = {k: int((stats / k).read_text()) for k in ("tx_bytes", "rx_bytes")}
        return out

    # --- datastores and disks --------------------------------------------------
    @method("datastore.list")
    async def m_datastore_list(self, conn: Connection) -> list[dict[str, Any]]:
        return await self.datastores.list()

    @method("disk.create")
    async def m_disk_create(self, conn: Connection, datastore: str, file: str, size_bytes: int,
                            format: str = "qcow2", encrypted: bool = False) -> dict[str, Any]:
        return await self.datastores.create(datastore, file, size_bytes, format, encrypted)

    @method("disk.import")
    async def m_disk_import(self, conn: Connection, datastore: str, file: str, source: str) -> dict[str, Any]:
        return await self.datastores.import_image(datastore, file, source)

    @method("disk.info")
    async def m_disk_info(self, conn: Connection, datastore: str, file: str) -> dict[str, Any]:
        return await self.datastores.info(datastore, file)

    @method("disk.delete")
    async def m_disk_delete(self, conn: Connection, datastore: str, file: str) -> None:
        for vm in self.vms.values():
            if vm.alive and self.datastores.path(datastore, file) in vm.disk_paths:
                raise Conflict(f"disk {file} on {datastore} is in use by running VM {vm.spec.name} "
                               f"on host {self.cfg.name}", hint="stop the VM first")
        await self.datastores.delete(datastore, file)

    # --- VMs -----------------------------------------------------------------------
    def _vm(self, name: str) -> VmProcess:
        try:
            return self.vms[name]
        except KeyError:
            raise NotFound(f"VM {name!r} is not on host {self.cfg.name}",
                           hint="`testbed vm list` shows where each VM is") from None

    @method("vm.start")
    async def m_vm_start(self, conn: Connection, spec: dict[str, Any], incoming: bool = False) -> dict[str, Any]:
        vspec = VmSpec.model_validate(spec)
        old = self.vms.get(vspec.name)
        if old is not None and old.alive:
            raise Conflict(f"VM {vspec.name} is already running on host {self.cfg.name}")
        if self.cfg.machine_types is not None and vspec.machine not in self.cfg.machine_types:
            raise InputError(f"host {self.cfg.name} does not offer machine type {vspec.machine}",
                             hint="it offers: " + ", ".join(self.cfg.machine_types))
        disk_paths = [self.datastores.path(d.datastore, d.file) for d in vspec.disks]
        for d, p in zip(vspec.disks, disk_paths, strict=False):
            if not p.exists():
                raise NotFound(f"disk {d.file} of VM {vspec.name} is not on datastore {d.datastore} "
                               f"of host {self.cfg.name}", hint="create the disk first")
        bridges = []
        for nic in vspec.nics:
            if nic.port_group not in self.cfg.port_groups:
                raise NotFound(f"port group {nic.port_group!r} does not exist on host {self.cfg.name}",
                               hint="port groups here: " + ", ".join(self.cfg.port_groups))
            bridges.append(self.cfg.port_groups[nic.port_group])
        if vspec.boot.builtin and self.cfg.guest_image_dir:
            gd = Path(self.cfg.guest_image_dir)
            vspec = vspec.model_copy(update={"boot": vspec.boot.model_copy(
                update={"kernel": str(gd / "vmlinuz"), "initrd": str(gd / "initrd.img")})})
        for path in (vspec.boot.kernel, vspec.boot.initrd):
            if path and not Path(path).is_file():
                raise NotFound(f"boot file {path} of VM {vspec.name} does not exist on host {self.cfg.name}",
                               hint="build the guest image with `make image` or give an existing path")
        vm = VmProcess(vspec, VmPaths(self.cfg.vms_dir / vspec.name), disk_paths, host=self.cfg.name,
                       qemu_binary=self.cfg.qemu_binary, accel=self.cfg.accel, bridges=bridges,
                       emit=self._emitter(vspec.name))
        self.vms[vspec.name] = vm
        try:
            await vm.start(incoming=incoming)
        except BaseException:
            if self.vms.get(vspec.name) is vm:
                del self.vms[vspec.name]
            raise
        return vm.describe()

    @method("vm.stop")
    async def m_vm_stop(self, conn: Connection, name: str, timeout_s: float = 10.0) -> dict[str, Any]:
        vm = self._vm(name)
        how = await vm.stop(timeout_s)
        return {**vm.describe(), "how": how}

    @method("vm.kill")
    async def m_vm_kill(self, conn: Connection, name: str) -> dict[str, Any]:
        vm = self._vm(name)
        how = await vm.kill()
        return {**vm.describe(), "how": how}

    @method("vm.remove")
    async def m_vm_remove(self, conn: Connection, name: str) -> None:
        """Forget a stopped VM and remove its directory (console log included)."""
        vm = self.vms.get(name)
        vm_dir = self.cfg.vms_dir / name
        if vm is not None and vm.alive:
            raise Conflict(f"VM {name} is running on host {self.cfg.name}", hint="stop it first")
        if vm is None and not vm_dir.exists():
            raise NotFound(f"VM {name!r} is not on host {self.cfg.name}")
        self.vms.pop(name, None)
        shutil.rmtree(vm_dir, ignore_errors=True)

    @method("vm.list")
    async def m_vm_list(self, conn: Connection) -> list[dict[str, Any]]:
        out = []
        for vm in self.vms.values():
            d = vm.describe()
            if vm.alive:
                with contextlib.suppress(QemuError, asyncio.TimeoutError):
                    d["status"] = (await asyncio.wait_for(vm.execute("query-status"), 5))["status"]
            out.append(d)
        return out

    @method("vm.status")
    async def m_vm_status(self, conn: Connection, name: str) -> dict[str, Any]:
        vm = self._vm(name)
        d = vm.describe()
        if vm.alive:
            d["status"] = (await vm.execute("query-status"))["status"]
        return d

    @method("vm.qmp")
    async def m_vm_qmp(self, conn: Connection, name: str, command: str,
                       arguments: dict[str, Any] | None = None) -> Any:
        return await self._vm(name).execute(command, arguments)

    @method("vm.console_log")
    async def m_vm_console_log(self, conn: Connection, name: str) -> dict[str, Any]:
        """The VM's console: what it printed on earlier hosts (imported at migration), then here."""
        vm_dir = self.cfg.vms_dir / name
        if name not in self.vms and not vm_dir.exists():
            raise NotFound(f"VM {name!r} has no console log on host {self.cfg.name}")
        parts = []
        for f in ("serial-history.log", "serial.log"):
            with contextlib.suppress(FileNotFoundError):
                parts.append((vm_dir / f).read_bytes())
        return {"text": b"".join(parts).decode(errors="replace")}

    @method("vm.import_console_history")
    async def m_vm_import_console_history(self, conn: Connection, name: str, text: str) -> None:
        """Keep the console of the VM's life before it came here (written at migration commit)."""
        self._vm(name)
        (self.cfg.vms_dir / name / "serial-history.log").write_text(text)

    @method("vm.corrupt_memory")
    async def m_vm_corrupt_memory(self, conn: Connection, name: str, gpa: int, length: int = 1) -> dict[str, Any]:
        """Fault injection: invert ``length`` bytes of guest RAM at ``gpa`` (through the gdbstub)."""
        from testbed.qemu.gdbstub import GdbStub, flip_bytes
        vm = self._vm(name)
        running = (await vm.execute("query-status"))["status"] == "running"
        sock = vm.paths.dir / "gdb.sock"
        sock.unlink(missing_ok=True)
        await vm.execute("human-monitor-command", {"command-line": f"gdbserver unix:{sock},server=on,wait=off"})
        try:
            stub = await GdbStub.connect(sock)
            try:
                # a paused guest (e.g. a destination receiving its migration) must stay paused: no detach
                old, new = await flip_bytes(stub, gpa, length, detach=running)
            finally:
                await stub.close()
        finally:
            await vm.execute("human-monitor-command", {"command-line": "gdbserver none"})
            sock.unlink(missing_ok=True)
        log.warning("fault injected: VM %s gpa %#x: %s -> %s", name, gpa, old.hex(), new.hex())
        return {"gpa": gpa, "before": old.hex(), "after": new.hex()}

    # --- network probes (the vMotion precheck) ----------------------------------------------
    @method("net.probe_listen")
    async def m_net_probe_listen(self, conn: Connection, count: int = 2, open_s: float = 30.0) -> dict[str, Any]:
        """Listen on ``count`` ephemeral ports of the vMotion address for ``open_s``; count who connects."""
        if not self.cfg.vmotion_address:
            raise InputError(f"host {self.cfg.name} has no vMotion address configured")
        probe_id = f"probe-{time.monotonic_ns()}"
        hits: dict[int, int] = {}

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            port = writer.get_extra_info("sockname")[1]
            hits[port] = hits.get(port, 0) + 1
            writer.write(b"testbed-probe\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

        servers = [await asyncio.start_server(accept, self.cfg.vmotion_address, 0) for _ in range(count)]
        ports = [srv.sockets[0].getsockname()[1] for srv in servers]
        self.probes[probe_id] = hits

        async def close_later() -> None:
            await asyncio.sleep(open_s)
            for srv in servers:
                srv.close()
            self.probes.pop(probe_id, None)
        t = asyncio.get_running_loop().create_task(close_later())
        self._background.add(t)
        t.add_done_callback(self._background.discard)
        return {"id": probe_id, "address": self.cfg.vmotion_address, "ports": ports}

    @method("net.probe_connect")
    async def m_net_probe_connect(self, conn: Connection, address: str, ports: list[int],
                                  connect_timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """Connect from this host to ``address`` on each port; how each went and how long it took."""
        out: list[dict[str, Any]] = []
        for port in ports:
            t0 = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), connect_timeout_s)
                banner = await asyncio.wait_for(reader.readline(), connect_timeout_s)
                writer.close()
                out.append({"port": port, "ok": banner.startswith(b"testbed-probe"),
                            "connect_ms": round((time.monotonic() - t0) * 1000, 2)})
            except (OSError, TimeoutError) as err:
                out.append({"port": port, "ok": False, "error": str(err) or type(err).__name__})
        return out

    # --- migration ---------------------------------------------------------------------
    @method("migration.prepare_incoming")
    async def m_migration_prepare_incoming(self, conn: Connection, spec: dict[str, Any],
                                           streams: int = 1, postcopy: bool = False) -> dict[str, Any]:
        """Destination: start QEMU paused for incoming, NBD export of its disks, migrate-incoming."""
        if not self.cfg.vmotion_address:
            raise InputError(f"host {self.cfg.name} has no vMotion address configured")
        name = VmSpec.model_validate(spec).name
        await self.m_vm_start(conn, spec, incoming=True)
        role = DestinationRole(self.vms[name], self.cfg.vmotion_address)
        self.destinations[name] = role
        try:
            return await role.prepare(streams, postcopy)
        except BaseException:
            await self.vms[name].kill()
            raise

    @method("migration.abort_incoming")
    async def m_migration_abort_incoming(self, conn: Connection, name: str) -> dict[str, Any]:
        """Destination rollback: stop the incoming QEMU unless its guest already runs here (then ``Conflict``).

        One call, so that no resume can come between the check and the kill: the role stops reacting to the
        source's completion first, and the guest's run state is read after that."""
        role = self.destinations.get(name)
        if role is not None:
            await role.abort()
        vm = self._vm(name)
        if vm.alive:
            status = (await vm.execute("query-status"))["status"]
            if status == "running":
                raise Conflict(f"VM {name} already runs on host {self.cfg.name}: the move completed here",
                               hint="commit the move instead of aborting it")
            await vm.kill()
            return {"undone": [f"incoming QEMU of {name} on {self.cfg.name} stopped (was {status})"]}
        return {"undone": []}

    @method("migration.mirror")
    async def m_migration_mirror(self, conn: Connection, name: str, nbd_host: str, nbd_port: int,
                                 mode: str = "write-blocking", granularity: int | None = None) -> list[str]:
        """Source: mirror every disk to the destination's NBD export (write-blocking or background-throttled)."""
        vm = self._vm(name)
        if name in self.sources:
            raise Conflict(f"VM {name} on host {self.cfg.name} is already migrating")
        role = self.sources[name] = SourceRole(vm, Path(self.cfg.dir))
        return await role.mirror(nbd_host, nbd_port, mode, granularity)

    @method("migration.start")
    async def m_migration_start(self, conn: Connection, name: str, uri: str, streams: int = 1,
                                auto_converge: bool = True, max_bandwidth_bps: int | None = None,
                                downtime_limit_ms: int = 300, hold_switchover: bool = False,
                                max_throttle_pct: int = 90, postcopy: bool = False,
                                sdps: dict[str, Any] | None = None) -> None:
        role = self.sources.get(name)
        if role is None:   # a VM without disks skips the mirror
            role = self.sources[name] = SourceRole(self._vm(name), Path(self.cfg.dir))
        await role.migrate(uri, streams, auto_converge, max_bandwidth_bps, downtime_limit_ms, hold_switchover,
                           max_throttle_pct, postcopy=postcopy, sdps=sdps)

    @method("migration.tune")
    async def m_migration_tune(self, conn: Connection, name: str, downtime_limit_ms: int | None = None) -> None:
        await self._source(name).tune(downtime_limit_ms)

    @method("migration.start_postcopy")
    async def m_migration_start_postcopy(self, conn: Connection, name: str) -> None:
        await self._source(name).start_postcopy()

    @method("migration.pause")
    async def m_migration_pause(self, conn: Connection, name: str) -> None:
        """Post-copy on a broken channel: ``migrate-pause`` on whichever role this host has."""
        if name in self.sources:
            await self.sources[name].pause()
        elif name in self.destinations:
            await self.destinations[name].pause()
        else:
            raise NotFound(f"VM {name} is not migrating on host {self.cfg.name}")

    @method("migration.recover")
    async def m_migration_recover(self, conn: Connection, name: str) -> dict[str, Any]:
        """Destination: listen for the source again after a post-copy failure."""
        role = self.destinations.get(name)
        if role is None:
            raise NotFound(f"VM {name} is not migrating to host {self.cfg.name}")
        return {"uri": await role.recover()}

    @method("migration.resume")
    async def m_migration_resume(self, conn: Connection, name: str, uri: str) -> dict[str, Any]:
        """Source: reconnect a paused post-copy to ``uri``, if the destination answers at all."""
        host = uri.split(":")[1]
        if not await reachable(host):
            return {"resumed": False, "why": f"{host} does not answer from host {self.cfg.name}"}
        await self._source(name).resume(uri)
        return {"resumed": True}

    @method("migration.release_switchover")
    async def m_migration_release_switchover(self, conn: Connection, name: str) -> None:
        self._source(name).release_switchover()

    @method("migration.cancel")
    async def m_migration_cancel(self, conn: Connection, name: str, resume_completed: bool = False) -> dict[str, Any]:
        """Source rollback: cancel migration and mirrors, resume the guest here (after a completed migration only
        with ``resume_completed``: the caller has stopped the destination)."""
        role = self.sources.pop(name, None)
        if role is None:
            vm = self._vm(name)
            if vm.alive:
                status = (await vm.execute("query-status"))["status"]
                if status == "postmigrate" and not resume_completed:
                    return {"undone": ["the migration had completed: the guest stays paused here (postmigrate) "
                                       "until the destination is known to be stopped"], "completed": True}
                if status != "running":
                    await vm.execute("cont")
                    return {"undone": [f"guest resumed on the source (was {status})"], "completed": False}
            return {"undone": [], "completed": False}
        return await role.cancel(resume_completed)

    @method("migration.finish")
    async def m_migration_finish(self, conn: Connection, name: str) -> None:
        """Forget the migration roles of ``name`` on this host (after commit or rollback)."""
        role = self.sources.pop(name, None)
        if role is not None:
            role.detach()
        dest = self.destinations.pop(name, None)
        if dest is not None:
            dest.detach()

    def _source(self, name: str) -> SourceRole:
        try:
            return self.sources[name]
        except KeyError:
            raise NotFound(f"VM {name} is not migrating from host {self.cfg.name}") from None

    @method("disk.digest")
    async def m_disk_digest(self, conn: Connection, datastore: str, file: str) -> dict[str, Any]:
        """Per-MiB SHA-256 of a disk's contents, and the guest agent's block ring if present."""
        from testbed.hostd.diskcheck import digest
        return await digest(self.datastores.path(datastore, file), self.cfg.name)

    @method("vm.downtime_trace")
    async def m_vm_downtime_trace(self, conn: Connection, name: str) -> dict[str, float]:
        """QEMU's switchover checkpoints of VM ``name`` here: ``{"<checkpoint>_s": CLOCK_MONOTONIC}``."""
        from testbed.qemu.cmdline import downtime_checkpoints
        vm = self._vm(name)
        try:
            text = vm.paths.trace.read_text(errors="replace")
        except FileNotFoundError:
            return {}
        return {f"{k}_s": v for k, v in downtime_checkpoints(text, time.time() - time.monotonic()).items()}

    @method("host.clock")
    async def m_host_clock(self, conn: Connection) -> dict[str, float]:
        """This host's CLOCK_MONOTONIC now: the engine maps every instant this agent reports onto its own clock."""
        return {"monotonic_s": time.monotonic()}

    @method("disk.digest_live")
    async def m_disk_digest_live(self, conn: Connection, name: str, disk: int) -> dict[str, Any]:
        """``disk.digest`` of disk ``disk`` of a running VM, read through its QEMU at one instant (fleecing), with
        the chunks the guest wrote since it resumed here (``written_chunks``; None if it did not arrive here)."""
        from testbed.hostd.diskcheck import point_in_time
        vm = self._vm(name)
        if not isinstance(disk, int) or not 0 <= disk < len(vm.spec.disks):
            raise InputError(f"VM {name} on host {self.cfg.name} has no disk {disk!r}",
                             hint=f"its disks: 0 to {len(vm.spec.disks) - 1}")
        return await point_in_time(vm.execute, f"disk{disk}", vm.paths.dir, f"VM {name} on host {self.cfg.name}")

    # --- events ----------------------------------------------------------------------
    @method("events.subscribe")
    async def m_events_subscribe(self, conn: Connection, vms: list[str] | None = None) -> None:
        if vms is not None and not isinstance(vms, list):
            raise InputError("events.subscribe: vms must be a list of VM names")
        conn.subscribed = {check_vm_name(v) for v in vms or []}

    # --- dispatch ----------------------------------------------------------------------
    async def handle(self, conn: Connection, msg: dict[str, Any]) -> None:
        req_id = msg.get("id")
        method = str(msg.get("method", ""))
        try:
            if method not in METHODS:
                raise InputError(f"host agent on {self.cfg.name} has no method {method!r}")
            fn = getattr(self, METHODS[method])
            params = msg.get("params") or {}
            if not isinstance(params, dict):
                raise InputError("params must be an object")
            try:
                inspect.signature(fn).bind(conn, **params)
            except TypeError as err:
                raise InputError(f"bad parameters for {method}: {err}") from err
            # every method's ``name`` is a VM's, and becomes a directory under vms_dir: the one rule, first
            if "name" in params:
                check_vm_name(params["name"])
            result = await fn(conn, **params)
            await conn.send({"id": req_id, "result": result})
        except asyncio.CancelledError:
            raise
        except Exception as err:  # every failure goes back to the caller, as data
            if not isinstance(err, (InputError, NotFound, Conflict, QemuError)):
                log.exception("%s failed", method)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await conn.send({"id": req_id, "error": protocol.error_body(err)})

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        self.connections.add(conn)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while line := await reader.readline():
                try:
                    msg = protocol.decode(line)
                except ValueError as err:
                    await conn.send({"id": None, "error": {"kind": "InputError",
                                                           "message": f"not a JSON object: {err}", "hint": None}})
                    continue
                t = asyncio.create_task(self.handle(conn, msg))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections.discard(conn)
            for t in tasks:
                t.cancel()
            writer.close()


async def _static_facts(qemu_binary: str) -> dict[str, Any]:
    async def out(*argv: str) -> str:
        p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.DEVNULL)
        try:
            o, _ = await p.communicate()
        finally:
            # Cancelled (the agent stops while it warms up): reap the child here, or the
            # loop's close waits on a subprocess transport nobody owns any more.
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await asyncio.shield(p.wait())
        return o.decode(errors="replace")

    version_line = (await out(qemu_binary, "--version")).splitlines()[0]
    version = version_line.split("version", 1)[1].split()[0] if "version" in version_line else "unknown"
    machines: list[str] = []
    aliases: dict[str, str] = {}
    for line in (await out(qemu_binary, "-machine", "help")).splitlines()[1:]:
        parts = line.split()
        if not parts:
            continue
        machines.append(parts[0])
        if "(alias of" in line:
            aliases[parts[0]] = line.split("(alias of", 1)[1].strip(" )")
    cpu_models = sorted({line.split()[1] for line in (await out(qemu_binary, "-cpu", "help")).splitlines()
                         if line.startswith("x86 ") and len(line.split()) > 1})
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return {"qemu_version": version, "qemu_version_line": version_line, "machine_types": machines,
            "machine_aliases": aliases, "cpu_models": cpu_models, "host_cpu_model": cpu_model,
            "kernel": platform.release(),
            "product": "testbed-hostd", "agent_version": _agent_version()}


def _restrict_machines(facts: dict[str, Any], allowed: tuple[str, ...] | None) -> dict[str, Any]:
    """A host configured to offer only some machine types (an older host) reports only those;
    an alias (q35) then names the newest allowed type of its family."""
    if allowed is None:
        return facts
    machines = [m for m in facts["machine_types"] if m in allowed]
    aliases = {}
    for alias, target in facts["machine_aliases"].items():
        family = target.rsplit("-", 1)[0]
        same = sorted((m for m in machines if m.rsplit("-", 1)[0] == family), reverse=True)
        if target in machines or same:
            aliases[alias] = target if target in machines else same[0]
    return {**facts, "machine_types": machines, "machine_aliases": aliases}


def _agent_version() -> str:
    from testbed import __version__
    return __version__


async def serve(cfg: HostConfig, ready: Any = None, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT or until `stop` is set (tests stop an in-process agent so)."""
    agent = HostAgent(cfg)
    cfg.socket.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(agent.client, path=str(cfg.socket), limit=protocol.MAX_LINE)
    os.chmod(cfg.socket, 0o600)
    loop = asyncio.get_running_loop()
    signals: tuple[signal.Signals, ...] = ()
    if stop is None:
        stop, signals = asyncio.Event(), (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
    log.info("host agent %s listening on %s", cfg.name, cfg.socket)
    warm = loop.create_task(agent.warm_up())
    if ready is not None:
        ready()
    try:
        async with server:
            await stop.wait()
    finally:
        # Stopped or cancelled: the warm-up's QEMU queries end with the agent, never after it.
        warm.cancel()
        await asyncio.gather(warm, return_exceptions=True)
        for sig in signals:
            loop.remove_signal_handler(sig)
        # Like ESXi's hostd, a restarting agent leaves its VMs running.
        log.info("host agent %s stopping; %d VM(s) keep running", cfg.name, len(agent.vms))
        cfg.socket.unlink(missing_ok=True)
