"""Turn a VmSpec into a QEMU command line.

Everything a migration needs to match on both ends (machine type, CPU model,
device ids, node names) is derived from the spec alone, so the source and the
destination build the same devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from testbed.qemu.spec import VmSpec


@dataclass(frozen=True)
class VmPaths:
    """Host-side files of one VM, all in the VM's own directory."""

    dir: Path

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def trace(self) -> Path:
        """QEMU's ``vmstate_downtime_checkpoint`` trace (the switchover, step by step): ``downtime_checkpoints``."""
        return self.dir / "downtime-trace.log"


DOWNTIME_TRACE = "vmstate_downtime_checkpoint"


def downtime_checkpoints(text: str, realtime_minus_monotonic: float) -> dict[str, float]:
    """QEMU's switchover checkpoints (``src-downtime-start``, ``src-vm-stopped``, ``src-iterable-saved``,
    ``src-non-iterable-saved``, ``dst-precopy-loadvm-completed``, ``dst-precopy-bh-enter``, ...) from its log
    trace backend (``TID@SEC.USEC:vmstate_downtime_checkpoint NAME``, wall clock), as CLOCK_MONOTONIC seconds;
    the last occurrence of each."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        head, sep, rest = line.partition(f":{DOWNTIME_TRACE} ")
        if not sep or "@" not in head:
            continue
        try:
            wall = float(head.rsplit("@", 1)[1])
        except ValueError:
            continue
        out[rest.strip()] = wall - realtime_minus_monotonic
    return out


def disk_node(i: int) -> str:
    return f"disk{i}"


def tap_name(vm: str, i: int) -> str:
    """Tap device of NIC ``i``: at most 15 characters, unique per host."""
    base = f"t{i}-{vm}"
    return base[:15]


def build_cmdline(spec: VmSpec, paths: VmPaths, disk_paths: list[Path], *,
                  qemu_binary: str = "qemu-system-x86_64", accel: str = "tcg",
                  incoming: bool = False) -> list[str]:
    """The argv for ``spec``. ``incoming`` starts it paused, waiting for a migration."""
    if len(disk_paths) != len(spec.disks):
        raise ValueError("one path per disk is needed")
    argv = [
        qemu_binary,
        "-name", f"{spec.name},debug-threads=on",
        "-machine", spec.machine,
        "-accel", f"{accel},tb-size=128" if accel == "tcg" else accel,
        "-cpu", spec.cpu_model,
        "-m", f"{spec.memory_bytes // (1024 * 1024)}M",
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        # the monitor: QEMU connects to the socket its host agent listens on (no polling for a socket to appear)
        "-chardev", f"socket,id=qmp0,path={paths.qmp}", "-mon", "chardev=qmp0,mode=control",
        "-chardev", f"file,id=serial0,path={paths.serial_log},append=on",
        "-serial", "chardev:serial0",
        "-pidfile", str(paths.pidfile),
        # the switchover step by step, for the downtime breakdown (wall-clock stamped: -msg timestamp=on)
        "-trace", f"enable={DOWNTIME_TRACE},file={paths.trace}", "-msg", "timestamp=on",
    ]
    boot = spec.boot
    if boot.kernel is not None:
        argv += ["-kernel", boot.kernel]
        if boot.initrd:
            argv += ["-initrd", boot.initrd]
        if boot.append:
            argv += ["-append", boot.append]
    for i, (disk, path) in enumerate(zip(spec.disks, disk_paths, strict=False)):
        node = disk_node(i)
        crypt = ""
        if disk.encrypted:
            argv += ["-object", f"secret,id={node}-key,file={path.with_name(f'.{path.name}.key')},format=raw"]
            crypt = f",encrypt.format=luks,encrypt.key-secret={node}-key"
        argv += [
            "-blockdev", f"driver=file,filename={path},node-name={node}-file,cache.direct=off",
            "-blockdev", f"driver={disk.format},file={node}-file,node-name={node}{crypt}",
            "-device", f"virtio-blk-pci,drive={node},id={node}-dev"
            + (",bootindex=0" if i == 0 and boot.from_disk else ""),
        ]
    for i, nic in enumerate(spec.nics):
        argv += [
            "-netdev", f"tap,id=net{i},ifname={tap_name(spec.name, i)},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net{i},mac={nic.mac},id=net{i}-dev",
        ]
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    return argv
