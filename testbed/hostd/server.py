"""The host agent daemon: JSON-lines RPC on a UNIX socket, one per host.

``HostAgent`` is its method groups put together (``host_methods``, ``vm_methods``, ``migration_methods``, each
handler registered under its protocol name with ``@method``, ``agent_base``); ``serve`` accepts connections
and dispatches requests concurrently; events from every VM's QMP go to the connections that subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
from typing import Any

from testbed.errors import Conflict, Forbidden, InputError, NotFound, QemuError, TicketRefused
from testbed.hostd import protocol
from testbed.hostd.agent_base import METHODS, Connection
from testbed.hostd.config import HostConfig
from testbed.hostd.host_methods import HostMethods
from testbed.hostd.migration_methods import MigrationMethods
from testbed.names import check_datastore_name, check_disk_file, check_vm_name

log = logging.getLogger("testbed.hostd")


class HostAgent(HostMethods, MigrationMethods):
    """One host's agent: every method group, and the dispatch of requests to them."""

    async def handle(self, conn: Connection, msg: dict[str, Any]) -> None:
        req_id = msg.get("id")
        method = str(msg.get("method", ""))
        try:
            params = msg.get("params") or {}
            if not isinstance(params, dict):
                raise InputError("params must be an object")
            if conn.ticket is not None:    # a ticket's connection: its scope, checked first, on every request
                self.tickets.check(conn.ticket, method, params)
            if method not in METHODS:
                raise InputError(f"host agent on {self.cfg.name} has no method {method!r}")
            fn = getattr(self, METHODS[method])
            try:
                inspect.signature(fn).bind(conn, **params)
            except TypeError as err:
                raise InputError(f"bad parameters for {method}: {err}") from err
            # every method's ``name`` is a VM's (a directory under vms_dir), ``datastore`` and ``file`` a disk's
            # (a file in that datastore's directory): the one rule for each, before the method runs
            if "name" in params:
                check_vm_name(params["name"])
            if "datastore" in params:
                check_datastore_name(params["datastore"])
            if "file" in params:
                check_disk_file(params["file"])
            result = await fn(conn, **params)
            await conn.send({"id": req_id, "result": result})
        except asyncio.CancelledError:
            raise
        except Exception as err:  # every failure goes back to the caller, as data
            if isinstance(err, TicketRefused):
                log.warning("%s", err.message)
            elif not isinstance(err, (InputError, NotFound, Conflict, QemuError, Forbidden)):
                log.exception("%s failed", method)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await conn.send({"id": req_id, "error": protocol.error_body(err)})

    async def bind(self, conn: Connection, msg: dict[str, Any]) -> bool:
        """``ticket.bind``: restrict this connection to a granted ticket, once, before any request. False: the
        bind was refused on a connection with no scope yet, which is then closed (it never gets the full API)."""
        params = msg.get("params")
        ticket = str(params.get("ticket")) if isinstance(params, dict) else ""
        try:
            if conn.ticket is not None:
                raise TicketRefused(f"ticket.bind refused: this connection is already bound to ticket {conn.ticket} "
                                    f"on host {self.cfg.name}; a connection's ticket cannot change")
            if conn.requests:
                raise TicketRefused(f"ticket.bind refused on host {self.cfg.name}: a connection is bound before "
                                    f"its first request, and this one has made {conn.requests}")
            scope = self.tickets.load(ticket)
        except TicketRefused as err:
            log.warning("%s", err.message)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await conn.send({"id": msg.get("id"), "error": protocol.error_body(err)})
            return conn.ticket is not None or conn.requests > 0
        conn.ticket = scope.id
        log.info("connection bound to ticket %s (VM %s, until %s)", scope.id, scope.vm, scope.expires_text())
        await conn.send({"id": msg.get("id"), "result": {"ticket": scope.id, "vm": scope.vm,
                                                         "expires_s": scope.expires_s}})
        return True

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
                if msg.get("method") == protocol.BIND_METHOD:
                    # in the reader itself, before the next line is read: nothing of the client's overtakes it
                    if not await self.bind(conn, msg):
                        break
                    continue
                conn.requests += 1
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
