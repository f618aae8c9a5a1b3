"""A VM of the host agent: the VMM layer's machine (``testbed.qemu.machine``) whose QMP events and exit are
relayed to the agent's clients as agent events."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.hostd.protocol import EventKind
from testbed.qemu.cmdline import VmPaths
from testbed.qemu.machine import QemuMachine
from testbed.qemu.spec import VmSpec

__all__ = ["EventSink", "VmProcess"]

EventSink = Callable[[EventKind, dict[str, Any]], None]


class VmProcess(QemuMachine):
    def __init__(self, spec: VmSpec, paths: VmPaths, disk_paths: list[Path], *, host: str, qemu_binary: str,
                 accel: str, bridges: list[str], emit: EventSink) -> None:
        super().__init__(spec, paths, disk_paths, host=host, qemu_binary=qemu_binary, accel=accel, bridges=bridges,
                         on_event=lambda ev: emit(EventKind.QMP, ev),
                         on_exit=lambda rc: emit(EventKind.VM_EXITED, {"returncode": rc}))
        self.emit = emit      # the migration roles emit their own events for this VM
