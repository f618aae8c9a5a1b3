"""The host agent's ``vm.*`` methods: start, stop, remove, status, QMP, console, and the fault injections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from testbed.errors import Conflict, Forbidden, InputError, NotFound, QemuError
from testbed.hostd.agent_base import AgentBase, Connection, method
from testbed.hostd.vm import VmProcess
from testbed.qemu.cmdline import VmPaths
from testbed.qemu.spec import VmSpec

log = logging.getLogger("testbed.hostd")


class VmMethods(AgentBase):
    """The VMs of this host."""

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
            if path:     # where it is first: whether a file outside those directories exists is not told
                self._check_boot_file(vspec.name, path)
            if path and not Path(path).is_file():
                raise NotFound(f"boot file {path} of VM {vspec.name} does not exist on host {self.cfg.name}",
                               hint="build the guest image with `make image` or give an existing path")
        vm = VmProcess(vspec, VmPaths(self.cfg.vm_dir(vspec.name)), disk_paths, host=self.cfg.name,
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

    def _check_boot_file(self, vm: str, path: str) -> None:
        """A kernel or initrd is loaded into the guest's memory: only from the built-in guest's directory or an
        import directory (a content library), never another file of the host."""
        dirs = [d for d in (self.cfg.guest_image_dir, *self.cfg.import_dirs) if d]
        p = Path(path).resolve()
        if not any(p.is_relative_to(Path(d).resolve()) for d in dirs):
            raise Forbidden(f"boot file {path} of VM {vm} is outside the directories host {self.cfg.name} boots "
                            f"from ({', '.join(dirs) or 'none configured'})",
                            hint="kernels and initrds come from a vCenter's content library: `testbed image add FILE`")

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
        vm_dir = self.cfg.vm_dir(name)
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
        vm_dir = self.cfg.vm_dir(name)
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
        (self.cfg.vm_dir(name) / "serial-history.log").write_text(text)

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
