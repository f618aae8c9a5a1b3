"""What the host agent's methods share: the method registry (``@method``), a client connection, and the
agent's state (its configuration, datastores, VM processes and migration roles)."""

from __future__ import annotations

import asyncio
import contextlib
import platform
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from testbed.errors import NotFound
from testbed.hostd import protocol
from testbed.hostd.config import HostConfig
from testbed.hostd.datastore import Datastores
from testbed.hostd.destination import DestinationRole
from testbed.hostd.protocol import EventKind
from testbed.hostd.source import SourceRole
from testbed.hostd.tickets import Tickets
from testbed.hostd.vm import VmProcess

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
        self.ticket: str | None = None   # bound to a ticket (``ticket.bind``): only its scope; None: the full API
        self.requests = 0                # requests read so far (a bind must come before any)
        self._lock = asyncio.Lock()

    async def send(self, msg: dict[str, Any]) -> None:
        async with self._lock:
            self.writer.write(protocol.encode(msg))
            await self.writer.drain()


class AgentBase:
    """The agent's state; the method groups (one class each) act on it."""

    def __init__(self, cfg: HostConfig) -> None:
        self.cfg = cfg
        self.datastores = Datastores(cfg)
        self.vms: dict[str, VmProcess] = {}
        self.sources: dict[str, SourceRole] = {}
        self.destinations: dict[str, DestinationRole] = {}
        self.connections: set[Connection] = set()
        self.tickets = Tickets(Path(cfg.dir) / "tickets", cfg.name)
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

    def _emitter(self, vm: str) -> Any:
        def emit(kind: EventKind, data: dict[str, Any]) -> None:
            msg = {"event": kind, "vm": vm, "host": self.cfg.name, "data": data}
            for conn in list(self.connections):
                if conn.subscribed is not None and (not conn.subscribed or vm in conn.subscribed):
                    asyncio.ensure_future(self._send_quietly(conn, msg))
        return emit

    async def _send_quietly(self, conn: Connection, msg: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await conn.send(msg)

    def _vm(self, name: str) -> VmProcess:
        try:
            return self.vms[name]
        except KeyError:
            raise NotFound(f"VM {name!r} is not on host {self.cfg.name}",
                           hint="`testbed vm list` shows where each VM is") from None

    def _source(self, name: str) -> SourceRole:
        try:
            return self.sources[name]
        except KeyError:
            raise NotFound(f"VM {name} is not migrating from host {self.cfg.name}") from None


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
