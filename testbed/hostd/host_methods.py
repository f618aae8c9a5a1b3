"""The host agent's ``host.*``, ``datastore.*``, ``disk.*``, ``net.*`` and ``events.*`` methods."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from testbed.errors import Conflict, InputError, TicketRefused
from testbed.hostd.agent_base import AgentBase, Connection, method
from testbed.qemu.spec import check_vm_name


class HostMethods(AgentBase):
    """The host, its datastores and disks, its vMotion network, event subscriptions."""

    @method("host.ping")
    async def m_host_ping(self, conn: Connection) -> dict[str, Any]:
        return {"host": self.cfg.name, "pid": os.getpid(), "time_s": time.time()}

    @method("host.facts")
    async def m_host_facts(self, conn: Connection) -> dict[str, Any]:
        """The host's facts; to a ticket's connection, of the other VMs and disks here nothing."""
        if self._facts_cache is None:
            self._facts_cache = await self._static_facts()
        mem_total = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                mem_total = int(line.split()[1]) * 1024
        datastores, vms = await self.datastores.list(), sorted(self.vms)
        if conn.ticket is not None:
            scope = self.tickets.load(conn.ticket)
            mine = {(d.datastore, d.file) for d in scope.disks}
            vms = [v for v in vms if v == scope.vm]
            datastores = [{**ds, "disks": [f for f in ds.get("disks", []) if (ds["name"], f) in mine]}
                          for ds in datastores]
        return {
            "name": self.cfg.name, **self._facts_cache,
            "accel": self.cfg.accel, "accel_reason": self.cfg.accel_reason,
            "cpus": os.cpu_count(), "memory_available_bytes": mem_total,
            "license": self.cfg.license,
            "datastores": datastores,
            "port_groups": [{"name": n, "bridge": b} for n, b in self.cfg.port_groups.items()],
            "mgmt_address": self.cfg.mgmt_address, "vmotion_address": self.cfg.vmotion_address,
            "vms": vms,
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

    @method("datastore.list")
    async def m_datastore_list(self, conn: Connection) -> list[dict[str, Any]]:
        return await self.datastores.list()

    @method("disk.create")
    async def m_disk_create(self, conn: Connection, datastore: str, file: str, size_bytes: int,
                            format: str = "qcow2", encrypted: bool = False) -> dict[str, Any]:
        return await self.datastores.create(datastore, file, size_bytes, format, encrypted)

    @method("disk.import")
    async def m_disk_import(self, conn: Connection, datastore: str, file: str, source: str,
                            format: str | None = None) -> dict[str, Any]:
        """Copy ``source`` (a file of an import directory: a vCenter's content library) in as a qcow2 disk;
        ``format`` (qcow2 or raw): what the caller knows it is (None: read from its header, never qemu-img's guess)."""
        return await self.datastores.import_image(datastore, file, source, format)

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

    @method("host.clock")
    async def m_host_clock(self, conn: Connection) -> dict[str, float]:
        """This host's CLOCK_MONOTONIC now: the engine maps every instant this agent reports onto its own clock."""
        return {"monotonic_s": time.monotonic()}

    @method("events.subscribe")
    async def m_events_subscribe(self, conn: Connection, vms: list[str] | None = None) -> None:
        if vms is not None and not isinstance(vms, list):
            raise InputError("events.subscribe: vms must be a list of VM names")
        conn.subscribed = {check_vm_name(v) for v in vms or []}

    @method("ticket.grant")
    async def m_ticket_grant(self, conn: Connection, scope: dict[str, Any]) -> dict[str, Any]:
        """Write a ticket's scope (testbed.hostd.tickets): the destination vCenter, over its own connection."""
        if conn.ticket is not None:
            raise TicketRefused(f"ticket.grant refused: a ticket's connection cannot grant tickets "
                                f"(ticket {conn.ticket} on host {self.cfg.name})")
        s = self.tickets.grant(scope)
        return {"id": s.id, "vm": s.vm, "expires_s": s.expires_s}

    @method("ticket.revoke")
    async def m_ticket_revoke(self, conn: Connection, ticket: str) -> dict[str, bool]:
        """Remove a ticket's scope: its connections, even open ones, can do nothing more."""
        if conn.ticket is not None:
            raise TicketRefused(f"ticket.revoke refused: a ticket's connection cannot revoke tickets "
                                f"(ticket {conn.ticket} on host {self.cfg.name})")
        return {"revoked": self.tickets.revoke(ticket)}
