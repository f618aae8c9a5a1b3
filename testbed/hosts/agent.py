"""An async client of one host agent, over an SSH channel.

    async with await AgentClient.connect(target, agent_command) as agent:
        facts = await agent.call("host.facts")
        async with agent.events(["web01"]) as q: ...

A reader thread turns the channel's lines into futures and events on the
event loop; calls may overlap. A remote error comes back as ``AgentError``
(or the matching local class: NotFound, Conflict, InputError, QemuError, TicketRefused).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator
from typing import Any, Protocol

import paramiko

from testbed import errors
from testbed.errors import AgentError, HostUnreachable
from testbed.hostd import protocol
from testbed.hostd.protocol import EventKind
from testbed.hosts.ssh import SshSession, SshTarget
from testbed.qemu.spec import VmSpec

_REMOTE_KINDS: dict[str, type[errors.TestbedError]] = {
    "NotFound": errors.NotFound, "Conflict": errors.Conflict,
    "InputError": errors.InputError, "QemuError": errors.QemuError,
    "Forbidden": errors.Forbidden, "TicketRefused": errors.TicketRefused,
}


def remote_error(host: str, e: dict[str, Any]) -> errors.TestbedError:
    """An agent's error answer as the matching local exception (``AgentError`` for a kind we do not share)."""
    cls = _REMOTE_KINDS.get(e.get("kind", ""))
    if cls is not None:
        return cls(e.get("message", "?"), hint=e.get("hint"))
    return AgentError(f"host {host}: {e.get('message')}", kind=e.get("kind", "AgentError"), hint=e.get("hint"))


class Agent(Protocol):
    """What the engine and the vCenter need of a host agent: ``AgentClient`` over SSH, or a test's scripted one."""

    host: str

    @property
    def closed(self) -> bool: ...

    async def call(self, method: str, timeout_s: float | None = None, **params: Any) -> Any: ...

    def events(self, vms: list[str] | None = None) -> contextlib.AbstractAsyncContextManager[
            asyncio.Queue[dict[str, Any]]]: ...

    async def close(self) -> None: ...


class AgentClient:
    def __init__(self, session: SshSession, chan: paramiko.Channel, loop: asyncio.AbstractEventLoop) -> None:
        self.host = session.target.host
        self._session = session
        self._chan = chan
        self._loop = loop
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._queues: list[asyncio.Queue[dict[str, Any]]] = []
        self._closed = asyncio.Event()
        self._send_lock = threading.Lock()
        self._stderr = b""
        threading.Thread(target=self._reader, name=f"agent-{self.host}", daemon=True).start()

    @classmethod
    async def connect(cls, target: SshTarget, agent_command: str) -> AgentClient:
        session = await asyncio.to_thread(SshSession, target)
        try:
            chan = await asyncio.to_thread(session.open_channel, agent_command)
        except Exception:
            session.close()
            raise
        client = cls(session, chan, asyncio.get_running_loop())
        try:
            await asyncio.wait_for(client.call("host.ping"), 15)
        except BaseException:
            await client.close()
            raise
        return client

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- reader thread ------------------------------------------------------------
    def _reader(self) -> None:
        buf = b""
        try:
            while True:
                data = self._chan.recv(1 << 20)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self._loop.call_soon_threadsafe(self._dispatch, protocol.decode(line))
        except Exception:  # the channel died; fail what is pending below
            pass
        with contextlib.suppress(Exception):
            while self._chan.recv_stderr_ready():
                self._stderr += self._chan.recv_stderr(65536)
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._lost)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            for q in self._queues:
                q.put_nowait(msg)
            return
        fut = self._pending.pop(msg.get("id", -1), None)
        if fut is None or fut.done():
            return
        if "error" in msg:
            fut.set_exception(remote_error(self.host, msg["error"] or {}))
        else:
            fut.set_result(msg.get("result"))

    def _lost(self) -> None:
        self._closed.set()
        why = self._stderr.decode(errors="replace").strip()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(HostUnreachable(
                    f"the connection to the host agent on {self.host} was lost" + (f": {why}" if why else ""),
                    hint="check `testbed lab status`; the agent may have stopped"))
        self._pending.clear()
        for q in self._queues:
            q.put_nowait({"event": EventKind.CONNECTION_LOST.value, "host": self.host})

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # --- calls ---------------------------------------------------------------------
    async def call(self, method: str, timeout_s: float | None = None, **params: Any) -> Any:
        if self._closed.is_set():
            raise HostUnreachable(f"the connection to the host agent on {self.host} is closed")
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[req_id] = fut
        line = protocol.encode({"id": req_id, "method": method, "params": params})

        def send() -> None:
            with self._send_lock:
                self._chan.sendall(line)

        try:
            await asyncio.to_thread(send)
        except OSError as err:
            self._pending.pop(req_id, None)
            raise HostUnreachable(f"cannot send to the host agent on {self.host}: {err}") from err
        if timeout_s is None:
            return await fut
        return await asyncio.wait_for(fut, timeout_s)

    @contextlib.asynccontextmanager
    async def events(self, vms: list[str] | None = None) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of this agent's events (of ``vms``, or all) for the block's duration."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._queues.append(q)
        try:
            await self.call("events.subscribe", vms=vms)
            yield q
        finally:
            self._queues.remove(q)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._chan.close()
        await asyncio.to_thread(self._session.close)


async def remove_vm(agent: Agent, spec: VmSpec, *, finish_migration: bool = False, strict: bool = False,
                    timeout_s: float | None = None) -> tuple[list[str], list[str]]:
    """Stop ``spec``'s VM on the agent's host, forget it and delete its disks: what was done and what failed, in
    words, one line a step.

    The one way a VM leaves a host. What is already gone (``NotFound``) is in neither list. Any other error is
    raised when ``strict`` (a commit must not half-succeed in silence); otherwise it is listed as failed and the
    remaining steps are still tried. ``finish_migration``: first drop the host's migration role
    for the VM (a move that ended)."""
    name = spec.name
    steps: list[tuple[str, str, dict[str, Any]]] = []
    if finish_migration:
        steps.append((f"migration of {name} finished", "migration.finish", {"name": name}))
    steps += [(f"VM {name} stopped", "vm.stop", {"name": name}), (f"VM {name} removed", "vm.remove", {"name": name})]
    steps += [(f"disk {d.file} deleted", "disk.delete", {"datastore": d.datastore, "file": d.file})
              for d in spec.disks]
    done: list[str] = []
    failed: list[str] = []
    for what, method, params in steps:
        try:
            await agent.call(method, timeout_s=timeout_s, **params)
        except errors.NotFound:
            continue            # already gone
        except (errors.TestbedError, TimeoutError) as err:
            if strict:
                raise
            first = err.message.splitlines()[0] if isinstance(err, errors.TestbedError) else "no answer in time"
            failed.append(f"{method} {params.get('file') or name} on {agent.host}: {first}")
            continue
        done.append(what)
    return done, failed
