"""One QEMU process and its monitor: the VMM layer's machine (qemu.machine's QEMUMachine pattern, async).

The machine listens on the VM's QMP socket and QEMU connects to it at start (``cmdline.build_cmdline``
says so in the argv it builds), so there is no polling for a socket to appear. ``async with`` starts it and
leaves it stopped. Leaving ``stop`` guarantees the
process is gone; it escalates from QMP ``quit`` to SIGTERM to SIGKILL and says
when it had to. A launch failure reports the exit code, the command line and
the tail of QEMU's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from testbed.errors import QemuError
from testbed.qemu.cmdline import VmPaths, build_cmdline, tap_name
from testbed.qemu.spec import VmSpec

log = logging.getLogger("testbed.qemu.machine")

QMP_ACCEPT_TIMEOUT_S = 20.0


class ProcState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"        # the QEMU process is up (the guest may be paused)
    STOPPING = "stopping"
    EXITED = "exited"


class QemuMachine:
    """``start`` launches QEMU and waits for its monitor; ``stop`` leaves it gone, whatever it takes.
    ``on_event`` gets each QMP event (after ``event_hooks``), ``on_exit`` the exit code."""

    def __init__(self, spec: VmSpec, paths: VmPaths, disk_paths: list[Path], *, host: str,
                 qemu_binary: str = "qemu-system-x86_64", accel: str = "tcg", bridges: list[str] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 on_exit: Callable[[int | None], None] | None = None) -> None:
        self.spec = spec
        self.paths = paths
        self.disk_paths = disk_paths
        self.host = host
        self.qemu_binary = qemu_binary
        self.accel = accel
        self.bridges = bridges or []    # one per NIC: the bridge of its port group
        self.on_event, self.on_exit = on_event, on_exit
        self.state = ProcState.STARTING
        self.incoming = False
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient(spec.name)
        self.returncode: int | None = None
        self.started_s: float = 0.0
        self.argv: list[str] = []
        self._exited = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Local reactions to this VM's own QMP events (the migration roles use them),
        # run before the event is relayed to clients.
        self.event_hooks: list[Callable[[dict[str, Any]], None]] = []

    # --- lifecycle -------------------------------------------------------
    async def __aenter__(self) -> QemuMachine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, incoming: bool = False) -> None:
        self.incoming = incoming
        self.paths.dir.mkdir(parents=True, exist_ok=True)
        self.paths.qmp.unlink(missing_ok=True)
        self.argv = build_cmdline(self.spec, self.paths, self.disk_paths, qemu_binary=self.qemu_binary,
                                  accel=self.accel, incoming=incoming)
        await self._make_taps()
        await self.qmp.start_server(str(self.paths.qmp))
        with open(self.paths.qemu_log, "ab") as logf:
            logf.write(f"--- {time.strftime('%F %T')} {shlex.join(self.argv)}\n".encode())
            logf.flush()
            self.started_s = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                start_new_session=True)
        self._tasks.append(asyncio.create_task(self._reap()))
        # listening before the monitor connects: an event QEMU sends right after the handshake is queued, not lost
        self.qmp.register_listener(listener := self._listener())
        accept = asyncio.create_task(self.qmp.accept())
        exited = asyncio.create_task(self._exited.wait())
        done, _ = await asyncio.wait({accept, exited}, timeout=QMP_ACCEPT_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if accept not in done:
            accept.cancel()
            exited.cancel()
            with contextlib.suppress(BaseException):
                await accept
            if not self._exited.is_set():
                await self.kill()
            raise self._launch_error("QEMU exited before its monitor connected"
                                     if exited in done else
                                     f"QEMU's monitor did not connect within {QMP_ACCEPT_TIMEOUT_S:.0f} s")
        exited.cancel()
        accept.result()
        self._tasks.append(asyncio.create_task(self._pump_events(listener)))
        self.state = ProcState.RUNNING

    def _listener(self) -> Any:
        from qemu.qmp import EventListener
        return EventListener()

    async def _pump_events(self, listener: Any) -> None:
        async for event in listener:
            ev = {"event": event["event"], "data": dict(event.get("data", {})),
                  "timestamp": dict(event["timestamp"]), "monotonic_s": time.monotonic()}
            for hook in list(self.event_hooks):
                try:
                    hook(ev)
                except Exception:  # a broken hook must not stop the event stream
                    log.exception("event hook failed on VM %s", self.spec.name)
            if self.on_event is not None:
                self.on_event(ev)

    def _launch_error(self, what: str) -> QemuError:
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(self.paths.qemu_log.read_text(errors="replace").splitlines()[-15:])
        rc = f"exit code {self.returncode}" if self.returncode is not None else "killed by the agent"
        return QemuError(
            f"VM {self.spec.name} on host {self.host}: {what} ({rc}).\n"
            f"  command: {shlex.join(self.argv)}\n  QEMU log tail:\n    " + tail.replace("\n", "\n    "),
            hint=f"read the log above or {self.paths.qemu_log}")

    async def _reap(self) -> None:
        assert self.proc is not None
        self.returncode = await self.proc.wait()
        self.state = ProcState.EXITED
        self._exited.set()
        for task in self._tasks:   # the event pump would wait forever on a closed monitor
            if task is not asyncio.current_task():
                task.cancel()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        await self._remove_taps()
        if self.on_exit is not None:
            self.on_exit(self.returncode)

    async def wait_exited(self, timeout_s: float | None) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self._exited.is_set()

    async def stop(self, timeout_s: float = 10.0, term_timeout_s: float = 5.0) -> str:
        """Stop QEMU: QMP quit (``timeout_s`` to exit), then SIGTERM (``term_timeout_s``), then SIGKILL.
        Returns how it ended."""
        if not self.alive:
            return "not running"
        self.state = ProcState.STOPPING
        with contextlib.suppress(QMPError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self.qmp.execute("quit"), 2.0)
        if await self.wait_exited(timeout_s):
            return "quit"
        log.warning("VM %s on %s did not quit within %.0f s; sending SIGTERM", self.spec.name, self.host, timeout_s)
        self._signal(signal.SIGTERM)
        if await self.wait_exited(term_timeout_s):
            return "terminated (SIGTERM after quit timed out)"
        return await self.kill()

    async def kill(self) -> str:
        self._signal(signal.SIGKILL)
        await self.wait_exited(10.0)
        return "killed (SIGKILL)"

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    # --- QMP ---------------------------------------------------------------
    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *, oob: bool = False) -> Any:
        """A QMP command. ``oob``: out of band, where QEMU offers it (``allow-oob`` commands such as
        ``migrate-pause``): answered even while QEMU's main thread is blocked, as in a post-copy that waits
        for a page over a dead channel. Where the monitor has no OOB it is sent in band."""
        if not self.alive:
            raise QemuError(f"VM {self.spec.name} is not running on host {self.host}",
                            hint="start it first")
        greeting = self.qmp.greeting
        oob = oob and greeting is not None and "oob" in greeting.QMP.capabilities
        try:
            return await self.qmp.execute(command, arguments, oob=oob)
        except QMPError as err:
            raise QemuError(f"QMP {command} on VM {self.spec.name} (host {self.host}) failed: {err}") from err

    # --- network -----------------------------------------------------------
    async def _ip(self, *argv: str, check: bool = True) -> None:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if check and proc.returncode != 0:
            raise QemuError(f"{' '.join(argv)} failed on host {self.host}: {err.decode().strip()}")

    async def _make_taps(self) -> None:
        for i, bridge in enumerate(self.bridges):
            tap = tap_name(self.spec.name, i)
            await self._ip("ip", "link", "del", tap, check=False)
            await self._ip("ip", "tuntap", "add", "dev", tap, "mode", "tap")
            await self._ip("ip", "link", "set", tap, "master", bridge, "up")

    async def _remove_taps(self) -> None:
        for i in range(len(self.bridges)):
            await self._ip("ip", "link", "del", tap_name(self.spec.name, i), check=False)

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec.name, "state": self.state.value, "pid": self.proc.pid if self.proc else None,
                "incoming": self.incoming, "returncode": self.returncode,
                "uptime_s": round(time.monotonic() - self.started_s, 3) if self.alive else None,
                "spec": self.spec.model_dump(), "dir": str(self.paths.dir)}
