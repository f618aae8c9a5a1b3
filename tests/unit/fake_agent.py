"""A scripted host agent for fast tests: the ``AgentClient`` interface (``call``, ``events``, ``close``,
``closed``, ``host``), answering from a table of handlers, with QEMU-like migration events on the queue the
engine reads. Every call is recorded, so a test asserts what was done, on which side, in which order.

``scripted_pair`` gives a source and a destination that carry a diskless or one-disk VM through a successful
move; a test replaces the handlers of the step it breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from testbed.errors import InputError, NotFound
from testbed.hosts.base import Host
from testbed.hosts.ssh import SshTarget
from testbed.migration.request import MigrationRequest, Place
from testbed.qemu.spec import BootSpec, DiskSpec, NicSpec, VmSpec

Handler = Callable[..., Any]


class FakeAgent:
    def __init__(self, host: str) -> None:
        self.host = host
        self.calls: list[tuple[str, dict[str, Any]]] = []   # (method, params and the caller's time limit)
        self.handlers: dict[str, Handler] = {}
        self._queues: list[asyncio.Queue[dict[str, Any]]] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def on(self, method: str, handler: Handler | Any) -> None:
        """Answer ``method`` with ``handler(**params)`` (an exception it raises goes to the caller), or a value."""
        self.handlers[method] = handler if callable(handler) else (lambda **_: handler)

    def emit(self, event: str, data: dict[str, Any], vm: str = "vm1") -> None:
        for q in self._queues:
            q.put_nowait({"event": event, "vm": vm, "host": self.host, "data": dict(data)})

    def emit_qmp(self, name: str, data: dict[str, Any], vm: str = "vm1") -> None:
        self.emit("qmp", {"event": name, "data": data, "monotonic_s": time.monotonic()}, vm)

    def called(self, method: str) -> list[dict[str, Any]]:
        return [p for m, p in self.calls if m == method]

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    async def call(self, method: str, timeout_s: float | None = None, **params: Any) -> Any:
        self.calls.append((method, params if timeout_s is None else {**params, "timeout_s": timeout_s}))
        handler = self.handlers.get(method)
        if handler is None:
            raise InputError(f"fake agent on {self.host}: no method {method!r} scripted")
        result = handler(**params)
        if asyncio.iscoroutine(result):
            result = await (result if timeout_s is None else asyncio.wait_for(result, timeout_s))
        return result

    @contextlib.asynccontextmanager
    async def events(self, vms: list[str] | None = None) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._queues.append(q)
        try:
            yield q
        finally:
            self._queues.remove(q)

    async def close(self) -> None:
        self._closed = True


class FakeHost(Host):
    """A host whose agent is a ``FakeAgent`` (the engine is handed the agents; this only names the host)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "site-a")

    def ssh_target(self) -> SshTarget:
        raise AssertionError("a fake host has no SSH")


MiB = 2**20


def spec(disk: bool = True) -> VmSpec:
    disks = (DiskSpec(datastore="ds-a", file="vm1-disk0.qcow2", size_bytes=4 * MiB),) if disk else ()
    return VmSpec(name="vm1", memory_bytes=64 * MiB, disks=disks, boot=BootSpec(kernel="/k", initrd="/i"),
                  nics=(NicSpec(port_group="VM Network", mac="52:54:00:00:00:01"),))


def digest(chunks: list[str], written: list[int] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"size_bytes": len(chunks) * MiB, "chunks": chunks, "chunk_bytes": MiB}
    if written is not None:
        d["written_chunks"] = written
    return d


def scripted_pair(vm: VmSpec) -> tuple[FakeAgent, FakeAgent]:
    """Source and destination agents that carry ``vm`` through a successful move (QEMU's events included)."""
    src, dst = FakeAgent("esx-a1"), FakeAgent("esx-b1")
    for a in (src, dst):
        a.on("host.clock", lambda: {"monotonic_s": time.monotonic()})
        a.on("vm.downtime_trace", {})
        a.on("migration.finish", None)
    src.on("vm.status", {"state": "running", "status": "running"})
    src.on("host.counters", {})
    dst.on("host.facts", {"vms": [], "machine_types": [vm.machine], "qemu_version": "9.2",
                          "port_groups": [{"name": n.port_group} for n in vm.nics],
                          "datastores": [{"name": "ds-b", "free_bytes": 2**40}]})
    dst.on("disk.create", None)
    dst.on("migration.prepare_incoming", {"uri": "tcp:198.18.2.11:8000",
                                          "nbd": {"host": "198.18.2.11", "port": 10809}})
    jobs = [f"mirror-{i}" for i in range(len(vm.disks))]
    src.on("migration.mirror", jobs)
    size = 4 * MiB

    def qmp(name: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command == "query-block-jobs":
            return [{"device": j, "len": size, "offset": size} for j in jobs]
        if command == "query-migrate":
            return {"status": "completed", "downtime": 42, "ram": {"transferred": 64 * MiB}}
        raise InputError(f"fake: QMP {command} not scripted")
    src.on("vm.qmp", qmp)

    def start(**params: Any) -> None:
        # QEMU's pre-copy as the source agent reports it: two rounds, then the pause at pre-switchover; the
        # agents then switch over on their own (the source continues, the destination resumes)
        async def run() -> None:
            t = time.monotonic()
            for n, remaining in ((1, 32 * MiB), (2, MiB)):
                src.emit("migration-progress", {
                    "status": "active", "dirty_sync_count": n, "transferred_bytes": n * 32 * MiB,
                    "remaining_bytes": remaining, "dirty_rate_pps": 100, "throttle_pct": 0, "mbps": 200.0,
                    "t_s": t + 0.1 * n})
                await asyncio.sleep(0.01)
            paused = time.monotonic()
            src.emit_qmp("MIGRATION", {"status": "pre-switchover"})
            await asyncio.sleep(0.01)
            src.emit("migration-switchover", {"mirror_done_s": paused + 0.001, "continued_s": paused + 0.002})
            dst.emit("migration-resumed", {"completed_s": paused + 0.02, "cont_s": paused + 0.03,
                                           "resumed_s": paused + 0.04})
        asyncio.get_running_loop().create_task(run())
    src.on("migration.start", start)
    dst.on("vm.status", {"state": "running", "status": "running"})
    same = [f"c{i}" for i in range(4)]
    src.on("disk.digest", lambda **_: digest(same))
    dst.on("disk.digest_live", lambda **_: digest(same, written=[]))
    src.on("vm.console_log", {"text": "booted\n"})
    dst.on("vm.import_console_history", None)
    for m in ("vm.stop", "vm.remove", "disk.delete"):
        src.on(m, None)
    # what a rollback asks of each side
    dst.on("migration.abort_incoming", {"undone": ["destination QEMU stopped"]})
    dst.on("vm.remove", None)
    dst.on("disk.delete", None)
    src.on("migration.cancel", {"undone": ["source migration cancelled", "source VM resumed"], "completed": False})
    return src, dst


def request(vm: VmSpec, src: FakeAgent, dst: FakeAgent, tmp: Path, **kw: Any) -> MigrationRequest:
    return MigrationRequest(spec=vm, source=Place(FakeHost(src.host), "vc-a", "ds-a"),
                            destination=Place(FakeHost(dst.host), "vc-b", "ds-b"),
                            observer_socket=tmp / "no-observer.sock", builtin_guest=False,
                            agents=(src, dst), **kw)


def not_there(**_: Any) -> None:
    raise NotFound("not there")
