"""What the host agent's unit tests share (a helper module, not a test module): a real host agent on a UNIX
socket in a tmp dir (no QEMU: its binary does not exist and the host has no vMotion address), clients of it, and a
ticket's scope. ``agent_lab`` makes one; tests/unit/conftest.py serves it as the ``lab`` fixture."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from testbed.hostd.config import DatastoreConfig, HostConfig
from testbed.hostd.server import HostAgent
from testbed.hostd.tickets import DESTINATION_METHODS
from testbed.qemu.spec import BootSpec, DiskSpec, NicSpec, VmSpec

ROOT = Path(__file__).resolve().parents[2]
TID = "0123456789ab"
VM = "web01"
MiB = 2**20


def vm_spec(name: str = VM, file: str = "web01.qcow2", kernel: str = "/k") -> VmSpec:
    return VmSpec(name=name, memory_bytes=64 * MiB, disks=(DiskSpec(datastore="ds1", file=file, size_bytes=MiB),),
                  boot=BootSpec(kernel=kernel, initrd="/i"),
                  nics=(NicSpec(port_group="VM Network", mac="52:54:00:00:00:01"),))


def scope(**kw: Any) -> dict[str, Any]:
    s = vm_spec()
    return {"id": TID, "vm": VM, "disks": [{"datastore": "ds1", "file": "web01.qcow2"}],
            "spec": s.model_dump(mode="json"), "methods": sorted(DESTINATION_METHODS),
            "expires_s": time.time() + 600, **kw}


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.n = reader, writer, 0

    async def send(self, method: str, id: Any = None, **params: Any) -> dict[str, Any]:
        self.n += 1
        rid = self.n if id is None else id
        try:
            self.writer.write((json.dumps({"id": rid, "method": method, "params": params}) + "\n").encode())
            await self.writer.drain()
        except ConnectionError:
            return {"closed": True}
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            if not line:
                return {"closed": True}
            msg = json.loads(line)
            if msg.get("id") == rid:
                return dict(msg)

    async def bind(self, ticket: str = TID) -> dict[str, Any]:
        return await self.send("ticket.bind", id="bind", ticket=ticket)


class Lab:
    def __init__(self, agent: HostAgent, cfg: HostConfig, tmp: Path) -> None:
        self.agent, self.cfg, self.tmp = agent, cfg, tmp
        self.clients: list[Client] = []

    async def connect(self) -> Client:
        c = Client(*await asyncio.open_unix_connection(str(self.cfg.socket)))
        self.clients.append(c)
        return c

    async def bound(self, **kw: Any) -> Client:
        full = await self.connect()
        assert "result" in await full.send("ticket.grant", scope=scope(**kw))
        c = await self.connect()
        assert (await c.bind())["result"]["vm"] == VM
        return c


@contextlib.asynccontextmanager
async def agent_lab(tmp_path: Path) -> AsyncIterator[Lab]:
    """A real host agent serving its full API on a UNIX socket under ``tmp_path``; stopped on the way out."""
    cfg = HostConfig(name="esx-t1", dir=str(tmp_path / "host"), qemu_binary=str(tmp_path / "no-qemu"),
                     datastores=(DatastoreConfig(name="ds1", path=str(tmp_path / "ds1"), capacity_bytes=64 << 20),),
                     port_groups={"VM Network": "pg0"})
    (tmp_path / "ds1").mkdir()
    agent = HostAgent(cfg)
    agent._facts_cache = {"qemu_version": "10.0", "machine_types": ["pc-q35-10.0"], "machine_aliases": {}}
    server = await asyncio.start_unix_server(agent.client, path=str(cfg.socket))
    lab = Lab(agent, cfg, tmp_path)
    try:
        yield lab
    finally:
        for c in lab.clients:
            c.writer.close()
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
