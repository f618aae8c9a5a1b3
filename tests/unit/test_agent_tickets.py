"""Scoped tickets (testbed.hostd.tickets): a real host agent on a UNIX socket in a tmp dir (no QEMU: its binary does
not exist and the host has no vMotion address), a full-API connection that grants, and ticket-bound connections
that try everything a ticket must not do. And the bridge (`testbed-hostd connect --ticket ID`) as sshd runs it."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.errors import Forbidden, InputError, TicketRefused
from testbed.hostd.datastore import set_format
from testbed.hostd.tickets import DESTINATION_METHODS, MAX_TTL_S
from testbed.hosts.agent import remote_error
from testbed.qemu.spec import VmSpec
from tests.unit.agentkit import ROOT, TID, VM, Client, Lab, MiB, scope, vm_spec


def refused(r: dict[str, Any], method: str) -> str:
    assert r.get("error", {}).get("kind") == "TicketRefused", r
    msg = str(r["error"]["message"])
    assert method in msg and TID in msg and "esx-t1" in msg
    return msg


# --- what a ticket must not do --------------------------------------------------------------------------------

async def test_raw_qmp_is_refused(lab: Lab) -> None:
    c = await lab.bound()
    refused(await c.send("vm.qmp", name=VM, command="quit"), "vm.qmp")
    refused(await c.send("vm.kill", name=VM), "vm.kill")
    refused(await c.send("vm.start", spec=vm_spec().model_dump(mode="json")), "vm.start")
    refused(await c.send("vm.corrupt_memory", name=VM, gpa=0), "vm.corrupt_memory")


async def test_another_vms_name_is_refused(lab: Lab) -> None:
    c = await lab.bound()
    for m in ("vm.status", "vm.remove", "migration.finish", "migration.abort_incoming", "disk.digest_live"):
        params: dict[str, Any] = {"name": "db01"}
        if m == "disk.digest_live":
            params["disk"] = 0
        assert "'db01' is not the ticket's VM" in refused(await c.send(m, **params), m)


async def test_disk_import_of_etc_shadow_is_refused_and_copies_nothing(lab: Lab) -> None:
    c = await lab.bound()
    refused(await c.send("disk.import", datastore="ds1", file="web01.qcow2", source="/etc/shadow"), "disk.import")
    assert list((lab.tmp / "ds1").iterdir()) == []


async def test_deleting_a_disk_outside_the_scope_is_refused(lab: Lab) -> None:
    other = lab.tmp / "ds1" / "db01.qcow2"
    other.write_bytes(b"precious")
    c = await lab.bound()
    msg = refused(await c.send("disk.delete", datastore="ds1", file="db01.qcow2"), "disk.delete")
    assert "db01.qcow2" in msg
    refused(await c.send("disk.delete", datastore="ds1", file="../ds1/db01.qcow2"), "disk.delete")
    refused(await c.send("disk.create", datastore="ds1", file="db01.qcow2", size_bytes=MiB), "disk.create")
    assert other.read_bytes() == b"precious"


@pytest.mark.parametrize("name", ["/", "../x", "..", ""])
async def test_a_path_as_vm_name_is_refused_and_removes_nothing(lab: Lab, name: str) -> None:
    victim = Path(lab.cfg.dir) / "x"
    victim.mkdir(parents=True)
    (Path(lab.cfg.dir) / "vms").mkdir(exist_ok=True)
    c = await lab.bound()
    refused(await c.send("vm.remove", name=name), "vm.remove")
    refused(await c.send("vm.import_console_history", name=name, text="x"), "vm.import_console_history")
    assert victim.is_dir() and (Path(lab.cfg.dir) / "vms").is_dir()


@pytest.mark.parametrize("vms", [None, [], ["db01"], [VM, "db01"]])
async def test_events_of_other_vms_are_refused(lab: Lab, vms: list[str] | None) -> None:
    c = await lab.bound()
    refused(await c.send("events.subscribe", vms=vms), "events.subscribe")


async def test_another_spec_for_the_incoming_qemu_is_refused(lab: Lab) -> None:
    c = await lab.bound()
    for other in (vm_spec(kernel="/etc/shadow"), vm_spec(file="db01.qcow2"), vm_spec(name="db01")):
        refused(await c.send("migration.prepare_incoming", spec=other.model_dump(mode="json")),
                "migration.prepare_incoming")
    refused(await c.send("migration.prepare_incoming", spec={"name": VM}), "migration.prepare_incoming")


async def test_a_ticket_cannot_grant_or_revoke(lab: Lab) -> None:
    c = await lab.bound()
    refused(await c.send("ticket.grant", scope=scope(id="ffffffffffff", vm="db01")), "ticket.grant")
    refused(await c.send("ticket.revoke", ticket=TID), "ticket.revoke")
    assert not (Path(lab.cfg.dir) / "tickets" / "ffffffffffff.json").exists()
    assert (Path(lab.cfg.dir) / "tickets" / f"{TID}.json").exists()


async def test_a_second_bind_is_refused_and_the_first_scope_stays(lab: Lab) -> None:
    full = await lab.connect()
    await full.send("ticket.grant", scope=scope(id="ffffffffffff", vm="db01", disks=[], spec=None))
    c = await lab.bound()
    msg = refused(await c.bind("ffffffffffff"), "ticket.bind")
    assert "already bound" in msg
    r = await c.send("vm.status", name="db01")        # still the first ticket's scope
    assert "'db01' is not the ticket's VM" in refused(r, "vm.status")


async def test_a_bind_after_a_request_is_refused(lab: Lab) -> None:
    full = await lab.connect()
    await full.send("ticket.grant", scope=scope())
    c = await lab.connect()
    assert "result" in await c.send("host.ping")
    r = await c.bind()
    assert r["error"]["kind"] == "TicketRefused" and "before its first request" in r["error"]["message"]


@pytest.mark.parametrize("ticket", ["fedcba987654", "../../etc/passwd", "0123456789AB", ""])
async def test_an_unknown_ticket_is_refused_and_the_connection_closed(lab: Lab, ticket: str) -> None:
    full = await lab.connect()
    await full.send("ticket.grant", scope=scope())
    c = await lab.connect()
    r = await c.bind(ticket)
    assert r["error"]["kind"] == "TicketRefused"
    assert (await c.send("host.ping")) == {"closed": True}     # never the full API


async def test_an_expired_ticket_is_refused_even_on_an_open_connection(lab: Lab) -> None:
    c = await lab.bound(expires_s=time.time() + 0.6)
    assert "result" in await c.send("host.ping")
    await asyncio.sleep(0.7)
    assert "expired" in refused(await c.send("host.ping"), "host.ping")
    late = await lab.connect()
    assert "expired" in (await late.bind())["error"]["message"]


async def test_a_revoked_ticket_is_refused_on_an_open_connection(lab: Lab) -> None:
    c = await lab.bound()
    full = await lab.connect()
    assert (await full.send("ticket.revoke", ticket=TID))["result"] == {"revoked": True}
    assert "not granted" in refused(await c.send("vm.status", name=VM), "vm.status")


@pytest.mark.parametrize("bad", [
    {"methods": ["vm.qmp"]}, {"methods": ["disk.import", "host.ping"]}, {"vm": "../x"}, {"vm": "/"},
    {"id": "x; rm -rf /"}, {"expires_s": lambda: time.time() - 1}, {"expires_s": lambda: time.time() + MAX_TTL_S + 60},
    {"spec": vm_spec(name="db01").model_dump(mode="json")}, {"disks": []}, {"extra": 1},
])
async def test_a_bad_scope_is_not_granted(lab: Lab, bad: dict[str, Any]) -> None:
    # an expiry is computed when the test runs, not when it is collected (a long suite runs it minutes later)
    bad = {k: v() if callable(v) else v for k, v in bad.items()}
    full = await lab.connect()
    r = await full.send("ticket.grant", scope=scope(**bad))
    assert r["error"]["kind"] == "InputError", r
    assert not list((Path(lab.cfg.dir) / "tickets").glob("*.json"))


async def test_the_scope_file_is_0600(lab: Lab) -> None:
    await lab.bound()
    p = Path(lab.cfg.dir) / "tickets" / f"{TID}.json"
    assert p.stat().st_mode & 0o777 == 0o600
    assert (p.parent.stat().st_mode & 0o777) == 0o700


# --- what a ticket may do: the destination's methods pass the scope check ------------------------------------

ALLOWED: dict[str, dict[str, Any]] = {
    "host.ping": {}, "host.facts": {}, "host.clock": {}, "events.subscribe": {"vms": [VM]},
    "disk.create": {"datastore": "ds1", "file": "web01.qcow2", "size_bytes": MiB},
    "disk.delete": {"datastore": "ds1", "file": "web01.qcow2"},
    "migration.prepare_incoming": {"spec": vm_spec().model_dump(), "streams": 2, "postcopy": True},
    "migration.abort_incoming": {"name": VM}, "migration.pause": {"name": VM}, "migration.recover": {"name": VM},
    "migration.status": {"name": VM}, "migration.finish": {"name": VM},
    "vm.status": {"name": VM}, "vm.remove": {"name": VM}, "vm.downtime_trace": {"name": VM},
    "vm.import_console_history": {"name": VM, "text": "boot\n"}, "disk.digest_live": {"name": VM, "disk": 0},
}


def test_every_destination_method_has_a_case() -> None:
    assert set(ALLOWED) == DESTINATION_METHODS
    assert not {"vm.qmp", "disk.import", "vm.kill", "vm.start", "vm.stop", "disk.digest",
                "ticket.grant", "ticket.revoke"} & DESTINATION_METHODS


@pytest.mark.parametrize("method", sorted(ALLOWED))
async def test_the_destination_methods_pass_the_scope_check(lab: Lab, method: str) -> None:
    c = await lab.bound()
    r = await c.send(method, **ALLOWED[method])
    # past the scope: what the method itself says (no VM here, no vMotion address, no qemu-img...)
    assert r.get("error", {}).get("kind") != "TicketRefused", r


async def test_host_facts_show_a_ticket_only_its_vm_and_disks(lab: Lab) -> None:
    for f in ("db01.qcow2", "web01.qcow2"):      # raw, as recorded: the agent never lets qemu-img guess a format
        (lab.tmp / "ds1" / f).write_bytes(b"x")
        set_format(lab.tmp / "ds1" / f, "raw")
    lab.agent.vms = {"db01": object(), VM: object()}  # type: ignore[dict-item]
    full = await lab.connect()
    everything = (await full.send("host.facts"))["result"]
    assert everything["vms"] == ["db01", VM] and everything["datastores"][0]["disks"] == ["db01.qcow2", "web01.qcow2"]
    c = await lab.bound()
    facts = (await c.send("host.facts"))["result"]
    assert facts["vms"] == [VM] and facts["datastores"][0]["disks"] == ["web01.qcow2"]
    lab.agent.vms = {}


async def test_the_full_api_is_unchanged_without_a_ticket(lab: Lab) -> None:
    full = await lab.connect()
    r = await full.send("vm.qmp", name="db01", command="query-status")
    assert r["error"]["kind"] == "NotFound"              # reached the method: no VM db01 here


def test_a_refusal_is_a_403_where_it_reaches_the_api() -> None:
    from testbed.vcenter.api import status_of
    err = remote_error("esx-t1", {"kind": "TicketRefused", "message": "vm.qmp refused", "hint": "h"})
    assert isinstance(err, TicketRefused) and isinstance(err, Forbidden) and err.hint == "h"
    assert status_of(err)[0] == 403


# --- the bridge, as sshd runs it ------------------------------------------------------------------------------

async def _bridge(lab: Lab, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "testbed.hostd", "connect", "--socket", str(lab.cfg.socket), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)


async def test_the_bridge_binds_before_relaying(lab: Lab) -> None:
    full = await lab.connect()
    await full.send("ticket.grant", scope=scope())
    p = await _bridge(lab, "--ticket", TID)
    assert p.stdin and p.stdout
    for i, (m, params) in enumerate([("vm.qmp", {"name": VM, "command": "quit"}),
                                     ("ticket.bind", {"ticket": TID}), ("host.ping", {})], 1):
        p.stdin.write((json.dumps({"id": i, "method": m, "params": params}) + "\n").encode())
    await p.stdin.drain()
    got = {}
    for _ in range(3):
        msg = json.loads(await asyncio.wait_for(p.stdout.readline(), 20))
        got[msg["id"]] = msg
    assert got[1]["error"]["kind"] == "TicketRefused"      # the client's first line is already in the scope
    assert got[2]["error"]["kind"] == "TicketRefused" and "already bound" in got[2]["error"]["message"]
    assert got[3]["result"]["host"] == "esx-t1"
    p.stdin.close()
    assert await asyncio.wait_for(p.wait(), 20) == 0


async def test_the_bridge_refuses_an_unknown_ticket_and_relays_nothing(lab: Lab) -> None:
    p = await _bridge(lab, "--ticket", "fedcba987654")
    out, err = await asyncio.wait_for(p.communicate(b'{"id":1,"method":"vm.kill","params":{"name":"web01"}}\n'), 20)
    assert p.returncode == 3 and out == b""
    assert b"not granted" in err


@pytest.mark.parametrize("bad", ["x; rm -rf /", "$(id)", "0123", "0123456789AB"])
def test_the_bridge_refuses_a_malformed_ticket_id(tmp_path: Path, bad: str) -> None:
    r = subprocess.run([sys.executable, "-m", "testbed.hostd", "connect", "--socket", str(tmp_path / "s"),
                        "--ticket", bad], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=30)
    assert r.returncode == 2 and "is not a ticket id" in r.stderr


# --- the ticket's key line and its lifetime --------------------------------------------------------------------

def test_the_key_line_forces_connect_with_the_ticket(tmp_path: Path) -> None:
    from testbed.vcenter.hostconn import ticket_key_line
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = (tmp_path / "k.pub").read_text()
    now = datetime.datetime(2026, 12, 4, 13, 0, 30, tzinfo=datetime.UTC)
    line = ticket_key_line(pub, TID, 3600, now=now)
    assert line.startswith(f'restrict,command="\\"${{TESTBED_HOSTD:-testbed-hostd}}\\" connect --ticket {TID}",'
                           'expiry-time="202612041401Z" ssh-ed25519 ')   # rounded up to the minute
    assert line.endswith(f" ticket-{TID}")
    (tmp_path / "authorized_keys").write_text(line + "\n")     # OpenSSH reads it as a key line with options
    out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "authorized_keys")], capture_output=True, text=True)
    assert out.returncode == 0 and f"ticket-{TID}" in out.stdout
    for bad in ("x; rm -rf /", 'a" b', "0123456789AB", ""):
        with pytest.raises(InputError):
            ticket_key_line(pub, bad, 3600)


def test_revoking_a_malformed_ticket_id_fails_before_ssh(tmp_path: Path) -> None:
    from testbed.vcenter.hostconn import ManagedHost, revoke_ticket
    h = ManagedHost("esx-t1", "198.18.250.9", tmp_path / "nokey", tmp_path / "known_hosts")
    with pytest.raises(InputError):
        revoke_ticket(h, '" ; rm -rf ~ ; "')


def test_a_ticket_lasts_the_move_not_three_hours() -> None:
    from testbed.migration.convergence import ConvergenceSettings, completion_timeout_s
    from testbed.migration.request import move_time_limit_s
    from testbed.vcenter.admission import TICKET_MARGIN_S, TICKET_MIN_TTL_S, ticket_ttl_s
    s = vm_spec()
    assert ticket_ttl_s(1800, s) == 1800 + TICKET_MARGIN_S            # the source's own limit
    assert ticket_ttl_s(10, s) == TICKET_MIN_TTL_S
    assert ticket_ttl_s(10 * 24 * 3600, s) == MAX_TTL_S
    own = ticket_ttl_s(None, s)                                        # an admit that did not say
    assert own == move_time_limit_s(s) + TICKET_MARGIN_S < 3 * 3600
    limit = move_time_limit_s(s, completion_timeout=900)
    assert limit >= 900 + 300                                          # completion timeout + the disk copy's limit
    assert move_time_limit_s(s, completion_timeout=900, allow_postcopy=True) > limit
    big = VmSpec(**{**s.model_dump(), "memory_bytes": 8 * 2**30})
    assert move_time_limit_s(big) >= completion_timeout_s(big.memory_bytes, ConvergenceSettings())


# --- the destination vCenter's side: scope before key, both revoked at the end ---------------------------------

class UnixAgent:
    """The real agent of the ``lab`` fixture as a vCenter's host connection (its full API: no ticket)."""

    host = "esx-t1"
    closed = False

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, method: str, timeout_s: float | None = None, **params: Any) -> Any:
        r = await self.client.send(method, **params)
        if "error" in r:
            raise remote_error(self.host, r["error"])
        return r.get("result")

    async def close(self) -> None:
        pass


async def _destination(vc: Any, lab: Lab) -> None:
    vc.inv.put_host({"name": "esx-t1", "address": "198.18.250.9", "cluster": "c", "state": "connected",
                     "license": "enterprise-plus", "host_key": "ssh-ed25519 AAAA",
                     "facts": {"datastores": [{"name": "ds1"}]}, "added_s": 0.0})
    vc._agents["esx-t1"] = UnixAgent(await lab.connect())


async def test_admission_writes_the_scope_before_the_key_and_revokes_both(vc: Any, lab: Lab,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.vcenter import hostconn
    from testbed.vcenter.admission import TICKET_MARGIN_S
    await _destination(vc, lab)
    keys: list[tuple[str, str, float]] = []
    scope_file: dict[str, Path] = {}

    async def grant(host: Any, aid: str, ttl_s: float) -> dict[str, Any]:
        p = Path(lab.cfg.dir) / "tickets" / f"{aid}.json"
        assert p.exists()                       # the scope is there before the key is
        scope_file["p"] = p
        keys.append(("grant", aid, ttl_s))
        return {"id": aid, "host": host.name, "expires": "x"}

    async def revoke(host: Any, aid: str) -> None:
        assert scope_file["p"].exists()         # the key goes first, then the scope
        keys.append(("revoke", aid, 0.0))

    monkeypatch.setattr(hostconn, "agrant_ticket", grant)
    monkeypatch.setattr(hostconn, "arevoke_ticket", revoke)
    t0 = time.time()
    adm = await vc.admit("vc-peer", {"vm": {"name": VM, "spec": vm_spec(file="web01.qcow2").model_dump(mode="json")},
                                     "host": "esx-t1", "datastore": "ds1", "move_timeout_s": 1200})
    aid = adm["id"]
    assert keys == [("grant", aid, 1200 + TICKET_MARGIN_S)]
    s = json.loads(scope_file["p"].read_text())
    assert s["vm"] == VM and s["disks"] == [{"datastore": "ds1", "file": "web01.qcow2"}]
    assert set(s["methods"]) == DESTINATION_METHODS
    assert t0 + 1200 + TICKET_MARGIN_S <= s["expires_s"] <= time.time() + 1200 + TICKET_MARGIN_S
    await vc.commit_incoming("vc-peer", aid, {"spec": s["spec"], "history": [], "verdict": "verified"})
    assert keys[-1] == ("revoke", aid, 0.0) and not scope_file["p"].exists()


async def test_a_key_that_could_not_be_installed_leaves_no_scope(vc: Any, lab: Lab,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.errors import HostUnreachable
    from testbed.vcenter import hostconn
    await _destination(vc, lab)

    async def unreachable(*a: Any) -> Any:
        raise HostUnreachable("cannot reach host esx-t1 over SSH")

    monkeypatch.setattr(hostconn, "agrant_ticket", unreachable)
    monkeypatch.setattr(hostconn, "arevoke_ticket", unreachable)
    with pytest.raises(HostUnreachable):
        await vc.admit("vc-peer", {"vm": {"name": VM, "spec": vm_spec().model_dump(mode="json")},
                                   "host": "esx-t1", "datastore": "ds1"})
    assert not list((Path(lab.cfg.dir) / "tickets").glob("*.json"))
    assert vc.inv.vm(VM) is None
