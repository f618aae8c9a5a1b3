"""The host agent's JSON-lines protocol, against a real agent on a UNIX socket (no root, no VM)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from testbed.hostd.config import DatastoreConfig, HostConfig
from testbed.hostd.server import serve


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.n = reader, writer, 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.n += 1
        self.writer.write((json.dumps({"id": self.n, "method": method, "params": params}) + "\n").encode())
        await self.writer.drain()
        while True:
            msg = json.loads(await asyncio.wait_for(self.reader.readline(), 20))
            if msg.get("id") == self.n:
                return dict(msg)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[RawClient]:
    """A host agent serving from tmp_path with a 64 MiB datastore (function scope)."""
    cfg = HostConfig(name="esx-t1", dir=str(tmp_path / "host"),
                     datastores=(DatastoreConfig(name="ds1", path=str(tmp_path / "ds1"), capacity_bytes=64 << 20),),
                     port_groups={"VM Network": "pg0"})
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(cfg, ready.set, stop))
    await asyncio.wait_for(ready.wait(), 10)
    reader, writer = await asyncio.open_unix_connection(str(cfg.socket))
    try:
        yield RawClient(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.wait_closed(), 10)
        stop.set()
        # Stops like `kill -TERM`: the agent ends its warm-up (QEMU queries) before it returns.
        await asyncio.wait_for(task, 20)


async def test_ping_and_unknown_method(agent: RawClient) -> None:
    ok = await agent.call("host.ping")
    assert ok["result"]["host"] == "esx-t1"
    bad = await agent.call("host.reboot")
    assert bad["error"]["kind"] == "InputError"
    assert "no method 'host.reboot'" in bad["error"]["message"]


async def test_bad_parameters_are_an_input_error(agent: RawClient) -> None:
    r = await agent.call("disk.create", datastore="ds1")
    assert r["error"]["kind"] == "InputError"
    assert "bad parameters for disk.create" in r["error"]["message"]
    r = await agent.call("host.ping", extra=1)
    assert r["error"]["kind"] == "InputError" and "extra" in r["error"]["message"]


@pytest.mark.parametrize("name", ["host_ping", "m_host_ping", "host.ping.x", "__init__", "handle", "client",
                                  "warm_up", ""])
async def test_only_registered_methods_can_be_called(agent: RawClient, name: str) -> None:
    """The method name is looked up in the registry (``@method``), never turned into an attribute name."""
    r = await agent.call(name)
    assert r["error"]["kind"] == "InputError" and "no method" in r["error"]["message"]


@pytest.mark.parametrize("name", ["/", "../x", "web01\n", "a/b", "", "Web01", 7, None, "x" * 40])
async def test_a_vm_name_is_checked_before_any_method_runs(agent: RawClient, tmp_path: Path, name: Any) -> None:
    """``vm.remove`` of ``/`` once meant ``rmtree(vms_dir / "/")``: the root file system."""
    marker = tmp_path / "host" / "keep-me"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("x")
    for method in ("vm.remove", "vm.console_log", "vm.status", "vm.import_console_history"):
        params = {"name": name, **({"text": "x"} if method == "vm.import_console_history" else {})}
        r = await agent.call(method, **params)
        assert r["error"]["kind"] == "InputError", (method, r)
        assert "is not allowed" in r["error"]["message"] and "lowercase letters" in r["error"]["hint"]
    r = await agent.call("events.subscribe", vms=[name])
    assert r["error"]["kind"] == "InputError"
    assert marker.read_text() == "x"


async def test_a_good_name_that_is_not_there_is_not_found(agent: RawClient) -> None:
    r = await agent.call("vm.remove", name="web01")
    assert r["error"]["kind"] == "NotFound"
    assert (await agent.call("events.subscribe", vms=["web01"]))["result"] is None
    r = await agent.call("events.subscribe", vms="web01")
    assert r["error"]["kind"] == "InputError"


class Agent:
    """What ``remove_vm`` needs of an ``AgentClient``, over the raw socket of the real agent."""

    host = "esx-t1"

    def __init__(self, raw: RawClient) -> None:
        self.raw = raw

    async def call(self, method: str, timeout_s: float | None = None, **params: Any) -> Any:
        from testbed.hosts.agent import remote_error
        r = await self.raw.call(method, **params)
        if "error" in r:
            raise remote_error(self.host, r["error"])
        return r["result"]


def spec_with(*files: str) -> Any:
    from testbed.qemu.spec import VmSpec
    return VmSpec.model_validate({"name": "web01", "memory_bytes": 256 << 20, "boot": {"kernel": "/k", "initrd": "/i"},
                                  "disks": [{"datastore": "ds1", "file": f, "size_bytes": 1 << 20} for f in files]})


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed (run `make setup`)")
async def test_remove_vm_says_what_it_did_and_what_failed(agent: RawClient) -> None:
    from testbed.errors import InputError
    from testbed.hosts.agent import remove_vm
    await agent.call("disk.create", datastore="ds1", file="web01.qcow2", size_bytes=1 << 20)
    a = Agent(agent)
    # no VM web01 here (NotFound: already gone, not listed); its disk is deleted; a bad file name fails
    done, failed = await remove_vm(a, spec_with("web01.qcow2", "../etc"))  # type: ignore[arg-type]
    assert done == ["disk web01.qcow2 deleted"]
    assert len(failed) == 1 and failed[0].startswith("disk.delete ../etc on esx-t1:")
    assert (await agent.call("datastore.list"))["result"][0]["disks"] == []
    with pytest.raises(InputError):                     # a commit's removal stops at the first real error
        await remove_vm(a, spec_with("../etc"), strict=True)  # type: ignore[arg-type]


def test_every_handler_is_registered_once() -> None:
    from testbed.hostd.server import METHODS, HostAgent
    handlers = {n for n in dir(HostAgent) if n.startswith("m_")}
    assert handlers == set(METHODS.values())
    assert all(name.count(".") == 1 for name in METHODS)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed (run `make setup`)")
async def test_disks_are_accounted_against_capacity(agent: RawClient) -> None:
    r = await agent.call("disk.create", datastore="ds1", file="a.qcow2", size_bytes=48 << 20)
    assert r["result"]["size_bytes"] == 48 << 20
    full = await agent.call("disk.create", datastore="ds1", file="b.qcow2", size_bytes=32 << 20)
    assert full["error"]["kind"] == "InputError"
    assert "ds1" in full["error"]["message"] and "16.0 MiB free" in full["error"]["message"]
    dup = await agent.call("disk.create", datastore="ds1", file="a.qcow2", size_bytes=1 << 20)
    assert dup["error"]["kind"] == "Conflict"
    ds = (await agent.call("datastore.list"))["result"][0]
    assert ds["provisioned_bytes"] == 48 << 20 and ds["disks"] == ["a.qcow2"]
    assert (await agent.call("disk.delete", datastore="ds1", file="a.qcow2"))["result"] is None
    missing = await agent.call("disk.delete", datastore="ds1", file="a.qcow2")
    assert missing["error"]["kind"] == "NotFound"


async def test_unknown_vm_and_datastore_are_not_found(agent: RawClient) -> None:
    r = await agent.call("vm.status", name="ghost")
    assert r["error"]["kind"] == "NotFound" and "esx-t1" in r["error"]["message"]
    r = await agent.call("disk.create", datastore="nope", file="x", size_bytes=1 << 20)
    assert r["error"]["kind"] == "NotFound" and "ds1" in r["error"]["hint"]


async def test_requests_may_overlap(agent: RawClient) -> None:
    w = agent.writer
    for i in (101, 102, 103):
        w.write((json.dumps({"id": i, "method": "host.ping", "params": {}}) + "\n").encode())
    await w.drain()
    ids = {json.loads(await agent.reader.readline())["id"] for _ in range(3)}
    assert ids == {101, 102, 103}


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_agent_stopped_during_warm_up_reaps_its_queries(tmp_path: Path, how: str) -> None:
    """A stop (SIGTERM) or a cancel while the start-up QEMU query still runs: the agent returns
    at once and leaves no child behind (an orphaned subprocess transport hung the loop's close)."""
    slow = tmp_path / "slow-qemu"
    pidfile = tmp_path / "child.pid"
    slow.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    slow.chmod(0o755)
    cfg = HostConfig(name="esx-t2", dir=str(tmp_path / "host"), qemu_binary=str(slow),
                     datastores=(DatastoreConfig(name="ds1", path=str(tmp_path / "ds1"), capacity_bytes=1 << 20),),
                     port_groups={"VM Network": "pg0"})
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(cfg, ready.set, stop))
    await asyncio.wait_for(ready.wait(), 10)
    for _ in range(200):                       # the warm-up's first query is running
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.025)
    pid = int(pidfile.read_text())
    t0 = asyncio.get_running_loop().time()
    if how == "stop":
        stop.set()
        await asyncio.wait_for(task, 10)
    else:
        task.cancel()
        await asyncio.gather(asyncio.wait_for(task, 10), return_exceptions=True)
        assert task.cancelled()
    assert asyncio.get_running_loop().time() - t0 < 5
    with pytest.raises(ProcessLookupError):    # killed and reaped, not left running or a zombie
        os.kill(pid, 0)
    assert not cfg.socket.exists()


def test_events_are_typed_and_an_unknown_kind_is_kept() -> None:
    from testbed.hostd.protocol import AgentEvent, EventKind, decode, encode
    e = AgentEvent.parse(decode(encode({"event": EventKind.QMP, "vm": "v1", "host": "esx-a1", "data": {
        "event": "MIGRATION", "data": {"status": "pre-switchover"}, "monotonic_s": 12.5}})))
    assert e.kind is EventKind.QMP and e.qmp_event == "MIGRATION" and e.migration_status() == "pre-switchover"
    assert e.at_s == 12.5 and e.vm == "v1" and e.host == "esx-a1" and e.side == ""
    p = AgentEvent.parse({"event": "migration-progress", "data": {"status": "active", "t_s": 1.0}})
    assert p.kind is EventKind.MIGRATION_PROGRESS and p.qmp_event is None and p.migration_status() is None
    odd = AgentEvent.parse({"event": "from-a-newer-agent", "data": "not a dict"})
    assert odd.kind is EventKind.OTHER and odd.raw_kind == "from-a-newer-agent" and odd.data == {}
    job = AgentEvent.parse({"event": "qmp", "data": {"event": "BLOCK_JOB_READY", "data": {"device": "m0"}}})
    assert job.qmp_data == {"device": "m0"} and job.migration_status() is None and job.at_s is None
