"""The vCenter services: SSO and the API's refusals, bad input, every precheck failing on purpose,
a pinned thumbprint that does not match, an untrusted peer, a cross-vCenter relocate end to end,
and a vCenter killed in the middle of a relocate.

One lab for the module (``vclab``): site B has an "older" host (esx-b2 offers only QEMU 9.2
machine types) and esx-b1 has a tiny second datastore, so the prechecks can fail for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from testbed import labctl
from testbed.errors import ApiError, NotFound
from testbed.lab import builder
from testbed.lab import observer as obs
from testbed.lab.state import record_alive
from testbed.lab.topology import DatastoreSpec, HostSpec, SiteSpec, Topology, VCenterSpec
from testbed.net import fabric
from testbed.net.cmd import run
from testbed.vcenter import deploy, sso
from testbed.vcenter.client import VcClient

from ..conftest import unique_lab_name

pytestmark = pytest.mark.lab
CHECKS = ["vm-state", "host-compatibility", "port-groups", "datastore-space", "vmotion-network",
          "name-resolution", "bandwidth", "license", "encryption", "vm-name"]


def vc_topology(name: str, linked: bool = False) -> Topology:
    dom_a, dom_b = ("vsphere.local", "vsphere.local") if linked else ("vsphere-a.local", "vsphere-b.local")
    if linked:
        return Topology(name=name, sites=(
            SiteSpec(name="site-a", vcenter=VCenterSpec(name="vc-a", sso_domain=dom_a),
                     hosts=(HostSpec(name="esx-a1"),)),
            SiteSpec(name="site-b", vcenter=VCenterSpec(name="vc-b", sso_domain=dom_b),
                     hosts=(HostSpec(name="esx-b1"),))))
    return Topology(name=name, sites=(
        SiteSpec(name="site-a", vcenter=VCenterSpec(name="vc-a", sso_domain=dom_a, session_ttl_s=600),
                 hosts=(HostSpec(name="esx-a1"), HostSpec(name="esx-a2"))),
        SiteSpec(name="site-b", vcenter=VCenterSpec(name="vc-b", sso_domain=dom_b),
                 hosts=(HostSpec(name="esx-b1", datastores=(DatastoreSpec(name="ds-esx-b1"),
                                                            DatastoreSpec(name="ds-tiny", capacity_bytes=64 * 2**20))),
                        HostSpec(name="esx-b2", machine_types=("pc-q35-9.2", "pc-i440fx-9.2"))))))


@pytest.fixture(scope="module")
def vclab(lab_env: Path) -> Iterator[str]:
    name = unique_lab_name()
    asyncio.run(deploy.up(vc_topology(name)))
    try:
        yield name
    finally:
        labctl.down(name)


def client(lab: str, vc: str, login: bool = True) -> VcClient:
    return deploy.client(lab, vc, login=login)


def dest_spec(lab: str, vc: str = "vc-b", **placement: Any) -> dict[str, Any]:
    cfg = deploy.config_of(lab, vc)
    return {"placement": {"host": "esx-b1", **placement},
            "destination_vcenter": deploy.destination_vcenter(cfg)}


def relocate(c: VcClient, vm: str, spec: dict[str, Any], timeout_s: float = 300) -> dict[str, Any]:
    tid = c.post(f"/api/vcenter/vm/{vm}", {"spec": spec}, params={"action": "relocate"})["task"]
    return c.wait_task(tid, timeout_s=timeout_s)


def wait_heartbeat(lab: str, vm: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = asyncio.run(obs.query(builder.LabPaths(lab).observer_socket,
                                   {"op": "stats", "vm": vm, "since_s": time.monotonic() - 1}))
        if st["count"] > 100:
            return
        time.sleep(0.3)
    raise AssertionError(f"VM {vm} sent no heartbeat within {timeout_s} s")


def running_on(lab: str, vm: str) -> list[str]:
    """Where the hosts themselves (asked with the lab operator's key) run ``vm``'s guest."""
    state = builder.load_state(lab)

    async def ask() -> list[str]:
        out = []
        for name, h in labctl.hosts_of(state).items():
            async with await h.agent() as agent:
                for d in await agent.call("vm.list"):
                    if d["name"] == vm and d["state"] == "running" and d.get("status") == "running":
                        out.append(name)
        return out
    return asyncio.run(ask())


async def _vm_list(lab: str, host: str) -> list[dict[str, Any]]:
    async with await labctl.hosts_of(builder.load_state(lab))[host].agent() as agent:
        return list(await agent.call("vm.list"))


def inventory_host(lab: str, vc: str, vm: str) -> str | None:
    with client(lab, vc) as c:
        try:
            return str(c.get(f"/api/vcenter/vm/{vm}")["host"])
        except NotFound:
            return None


@pytest.fixture(scope="module")
def app1(vclab: str) -> Iterator[str]:
    """A busy VM with a disk on esx-a1 (vc-a), heartbeat flowing."""
    with client(vclab, "vc-a") as c:
        c.post("/api/vcenter/vm", {"name": "app1", "placement": {"host": "esx-a1"}, "memory": "256M",
                                   "disk": "256M", "workload": "memory:10MB/s@64M,disk:1MB/s"})
    wait_heartbeat(vclab, "app1")
    yield "app1"


# --- SSO and the API's refusals -----------------------------------------------------------

def test_api_refuses_without_a_valid_token(vclab: str) -> None:
    cfg_a = deploy.config_of(vclab, "vc-a")
    anon = client(vclab, "vc-a", login=False)
    for path in ("/api/vcenter/vm", "/api/vcenter/host", "/api/cis/tasks", "/api/testbed/about"):
        with pytest.raises(ApiError) as e:
            anon.get(path)
        assert e.value.status == 401 and "vmware-api-session-id" in str(e.value)
    # wrong password, and a user of another domain
    with pytest.raises(ApiError) as e:
        anon.login(f"administrator@{cfg_a.sso_domain}", "not-the-password")
    assert e.value.status == 401 and "wrong user name or password" in str(e.value)
    with pytest.raises(ApiError) as e:
        anon.login("administrator@vsphere-b.local", deploy.admin_password(deploy.config_of(vclab, "vc-b")))
    assert e.value.status == 401 and "not in SSO domain vsphere-a.local" in str(e.value)
    # the other domain's token
    with client(vclab, "vc-b") as b:
        anon.token = b.token
        with pytest.raises(ApiError) as e:
            anon.get("/api/vcenter/vm")
        assert e.value.status == 401 and "not issued by SSO domain vsphere-a.local" in str(e.value)
    # an expired token, signed by the right domain (the lab operator holds the domain's secret)
    expired, _ = sso.issue(cfg_a.domain_secret.read_bytes(), f"administrator@{cfg_a.sso_domain}",
                           cfg_a.sso_domain, ttl_s=-1, issuer="vc-a")
    anon.token = expired
    with pytest.raises(ApiError) as e:
        anon.get("/api/vcenter/vm")
    assert e.value.status == 401 and "expired" in str(e.value)
    # a forged one
    anon.token = expired[:-4] + "AAAA"
    with pytest.raises(ApiError) as e:
        anon.get("/api/vcenter/vm")
    assert e.value.status == 401
    # logging out revokes the session
    c = client(vclab, "vc-a")
    token = c.token
    assert c.get("/api/session")["user"] == f"administrator@{cfg_a.sso_domain}"
    c.logout()
    c.token = token
    with pytest.raises(ApiError) as e:
        c.get("/api/vcenter/vm")
    assert e.value.status == 401 and "logged out" in str(e.value)
    # passwords are stored hashed
    db = (Path(cfg_a.dir) / "inventory.db").read_bytes()
    assert deploy.admin_password(cfg_a).encode() not in db and b"scrypt$" in db


def test_bad_input_gets_a_clear_error_and_changes_nothing(vclab: str) -> None:
    with client(vclab, "vc-a") as c:
        before = c.get("/api/vcenter/vm")
        ds_before = c.get("/api/vcenter/datastore")
        url = c.url + "/api/vcenter/vm"
        raw = c.http.post(url, data=b"{not json", headers={"vmware-api-session-id": str(c.token),
                                                             "Content-Type": "application/json"}, timeout=30)
        assert raw.status_code == 400 and "malformed request" in raw.json()["messages"][0]["default_message"]
        cases = [
            ({"name": "x1", "placement": {"host": "esx-a1"}, "colour": "red"}, 400, "colour"),
            ({"name": "Web 01;rm -rf", "placement": {"host": "esx-a1"}, "memory": "256M"}, 400, "not allowed"),
            ({"name": "x2", "placement": {"host": "esx-zz"}, "memory": "256M"}, 404, "esx-zz"),
            ({"name": "x3", "placement": {"host": "esx-a1", "datastore": "nope"}, "memory": "256M"}, 404, "nope"),
            ({"name": "x4", "placement": {"host": "esx-a1", "network": "Nope"}, "memory": "256M"}, 404, "Nope"),
            ({"name": "x5", "placement": {"host": "esx-a1"}, "memory": "lots"}, 400, "memory"),
            ({"name": "x6", "placement": {"host": "esx-a1"}, "memory": "256M", "disk": "1T"}, 400, "free"),
            ({"name": "x7", "placement": {"host": "esx-a1"}, "memory": "256M", "disk": "64T"}, 400, "2 TiB"),
            # issue 17's findings, as they were tried: a host file as a disk image or a kernel, a negative disk,
            # a disk size as a string of digits (it created a VM without a disk)
            ({"name": "x8", "placement": {"host": "esx-a1"}, "memory": "256M", "image": "/etc/shadow"}, 400,
             "content library item"),
            ({"name": "x9", "placement": {"host": "esx-a1"}, "memory": "256M", "kernel": "/etc/shadow"}, 400,
             "content library item"),
            ({"name": "x10", "placement": {"host": "esx-a1"}, "memory": "256M", "disk": -1}, 400, "disk"),
            ({"name": "x11", "placement": {"host": "esx-a1"}, "memory": "256M", "disk": "0"}, 400, "disk"),
            ({"name": "x12", "placement": {"host": "esx-a1"}, "memory": "256M", "image": "nosuchitem"}, 404,
             "no item 'nosuchitem'"),
        ]
        for body, status, words in cases:
            r = c.http.post(url, data=json.dumps(body), headers={"vmware-api-session-id": str(c.token),
                                                                  "Content-Type": "application/json"}, timeout=60)
            msg = r.json()["messages"][0]["default_message"]
            assert r.status_code == status and words in msg, (body, r.status_code, msg)
        with pytest.raises(NotFound):
            c.post("/api/vcenter/vm/no-such-vm", {"spec": {"placement": {"host": "esx-a2"}}},
                   params={"action": "relocate"})
        # bad relocate options are refused at the request, before the VM is looked up (no-such-vm: a 400, not the
        # 404), so before trust, prechecks and admission: no task is made
        tasks = c.get("/api/cis/tasks")
        for options, words in [({"bandwidth": -1}, "bandwidth"), ({"converge": "bogus"}, "converge"),
                               ({"streams": 0}, "streams"), ({"downtime_limit_ms": -5}, "downtime")]:
            for vm in ("no-such-vm", "x-any"):
                with pytest.raises(ApiError) as e:
                    c.post(f"/api/vcenter/vm/{vm}", {"spec": {"placement": {"host": "esx-b1"}, "options": options,
                                                             **{k: v for k, v in dest_spec(vclab).items()
                                                                if k != "placement"}}},
                           params={"action": "relocate"})
                assert e.value.status == 400 and words in str(e.value), (options, e.value)
        assert c.get("/api/cis/tasks") == tasks
        assert c.get("/api/vcenter/vm") == before
        assert c.get("/api/vcenter/datastore") == ds_before, "no disk was left behind by the refused creates"


# --- prechecks --------------------------------------------------------------------------------

@contextlib.contextmanager
def _vmk1_down(lab: str) -> Iterator[None]:
    ns = fabric.ns_name(lab, "esx-b1")
    run(["ip", "link", "set", "vmk1", "down"], netns=ns)
    try:
        yield
    finally:
        run(["ip", "link", "set", "vmk1", "up"], netns=ns)
        # a link going down takes its routes with it: put back the route to the other sites' vMotion networks
        run(["ip", "route", "replace", "198.18.16.0/20", "via", "198.18.17.1", "dev", "vmk1"], netns=ns)


@contextlib.contextmanager
def _forget_name(lab: str) -> Iterator[None]:
    hosts = Path("/etc/netns") / fabric.ns_name(lab, "vc-a") / "hosts"
    text = hosts.read_text()
    with open(hosts, "w") as f:   # in place: the file is bind-mounted into the vCenter's namespace
        f.write("".join(line + "\n" for line in text.splitlines() if "esx-b1" not in line))
    try:
        yield
    finally:
        with open(hosts, "w") as f:
            f.write(text)


@contextlib.contextmanager
def _licence(lab: str, edition: str) -> Iterator[None]:
    with client(lab, "vc-b") as b:
        b.patch("/api/vcenter/host/esx-b1", {"license": edition})
        try:
            yield
        finally:
            b.patch("/api/vcenter/host/esx-b1", {"license": "enterprise-plus"})


@contextlib.contextmanager
def _slow_link(lab: str) -> Iterator[None]:
    labctl.set_link(lab, change_bandwidth=True, bandwidth_bps=2 * 2**20)
    try:
        yield
    finally:
        labctl.set_link(lab, change_bandwidth=True, bandwidth_bps=None)


@pytest.fixture(scope="module")
def enc1(vclab: str) -> str:
    with client(vclab, "vc-a") as c:
        v = c.post("/api/vcenter/vm", {"name": "enc1", "placement": {"host": "esx-a2"}, "memory": "128M",
                                       "disk": "64M", "encrypted": True})
        assert v["disks"][0]["encrypted"] is True and v["power_state"] == "POWERED_ON"
    wait_heartbeat(vclab, "enc1")
    return "enc1"


PRECHECK_CASES = {
    # check that fails: (what to do around the relocate, placement overrides, words in its message)
    "host-compatibility": (contextlib.nullcontext, {"host": "esx-b2"}, "machine type pc-q35-10.0"),
    "port-groups": (contextlib.nullcontext, {"network": "DMZ-nowhere"}, "'DMZ-nowhere' do not exist on esx-b1"),
    "datastore-space": (contextlib.nullcontext, {"datastore": "ds-tiny"}, "has 0.1 GiB free"),
    "vmotion-network": (_vmk1_down, {}, "cannot open TCP connections to esx-b1's vMotion address"),
    "name-resolution": (_forget_name, {}, "cannot resolve esx-b1"),
    "license": (lambda lab: _licence(lab, "standard"), {}, "licence edition 'standard'"),
}


@pytest.mark.parametrize("check", [*PRECHECK_CASES, "encryption", "bandwidth"])
def test_each_precheck_fails_on_purpose(vclab: str, app1: str, enc1: str, check: str) -> None:
    vm = "app1"
    if check == "encryption":
        around: Any = contextlib.nullcontext
        placement: dict[str, Any] = {}
        words = "encrypted disk(s) enc1-disk0.qcow2"
        vm = enc1
    elif check == "bandwidth":
        # a warning, not an error: made visible by stopping the move with another check
        around, placement, words = _slow_link, {"network": "DMZ-nowhere"}, "may not converge"
    else:
        around, placement, words = PRECHECK_CASES[check]
    cm = around(vclab) if around is not contextlib.nullcontext else contextlib.nullcontext()
    with client(vclab, "vc-a") as c, cm:
        t = relocate(c, vm, dest_spec(vclab, **placement), timeout_s=120)
    assert t["status"] == "FAILED"
    got = {ch["name"]: ch for ch in t["prechecks"]}
    assert list(got) == CHECKS, f"every check runs and is reported: {t['error']}"
    ch = got[check]
    expected = "warning" if check == "bandwidth" else "error"
    assert ch["status"] == expected and words in ch["message"], ch
    assert ch["hint"], "a failing check says what to do"
    bad = [n for n, x in got.items() if x["status"] == "error"]
    assert bad == (["port-groups"] if check == "bandwidth" else [check]), t["prechecks"]
    assert t["error"]["message"].startswith(f"prechecks failed for relocating VM {vm}")
    assert t["error"]["kind"] == "PrecheckFailed" and t["error"]["failed_checks"] == bad
    # nothing moved: the VM runs where it was, in the inventory where it was
    assert running_on(vclab, vm) == [("esx-a2" if vm == enc1 else "esx-a1")]
    assert inventory_host(vclab, "vc-b", vm) is None


# --- trust -----------------------------------------------------------------------------------

def test_wrong_thumbprint_is_refused_before_any_data_moves(vclab: str, app1: str) -> None:
    spec = dest_spec(vclab)
    spec["destination_vcenter"]["thumbprint"] = ":".join(["AB"] * 32)
    with client(vclab, "vc-b") as b, client(vclab, "vc-a") as c:
        events_before = len(b.get("/api/testbed/events"))
        t = relocate(c, app1, spec, timeout_s=60)
        new = b.get("/api/testbed/events")[events_before:]
    assert t["status"] == "FAILED"
    assert "thumbprint" in t["error"]["message"] and "AB:AB" in t["error"]["message"]
    assert t["progress"]["phase"] == "trust" and t["prechecks"] == []
    assert t["result"] is None, "the engine never started"
    assert not [e for e in new if e["kind"] in ("UserLoginSessionEvent", "VmBeingMigratedEvent")], new
    assert running_on(vclab, app1) == ["esx-a1"]


def test_destination_refuses_a_vcenter_it_does_not_trust(vclab: str) -> None:
    with client(vclab, "vc-b") as b:
        body = {"vm": {"name": "intruder", "spec": {}}, "host": "esx-b1", "source_vcenter": "vc-x"}
        with pytest.raises(ApiError) as e:
            b.post("/api/testbed/xvmotion/admit", body)
        assert e.value.status == 403 and "trusted peer" in str(e.value)
        # signed, but in the name of a vCenter vc-b has no trust with
        cfg_a = deploy.config_of(vclab, "vc-a")
        b.peer, b.audience = ("vc-x", cfg_a.key), "vc-b"
        with pytest.raises(ApiError) as e:
            b.post("/api/testbed/xvmotion/admit", body, signed=True)
        assert e.value.status == 403 and "does not trust vCenter 'vc-x'" in str(e.value)
        assert inventory_host(vclab, "vc-b", "intruder") is None


def trust_as(lab: str, peer: str, b: VcClient) -> None:
    """What a relocate's first step does: ``peer`` proves it holds its certificate's key to ``b`` (logged in as
    its administrator), and ``b`` records the trust."""
    import base64

    from testbed.vcenter import certs
    cfg = deploy.config_of(lab, peer)
    nonce = b.post("/api/testbed/trust/challenge")
    sig = base64.b64encode(certs.sign(cfg.key, f"{nonce}|{peer}".encode())).decode()
    b.post("/api/testbed/trust", {"name": peer, "url": cfg.url, "certificate": cfg.cert.read_text(), "nonce": nonce,
                                  "signature": sig})


async def _agent_log(lab: str, host: str) -> str:
    """The host agent's own log, read on the host (netns hosts keep it in the agent's directory)."""
    from testbed.hosts.netns import NetnsHost
    h = labctl.hosts_of(builder.load_state(lab))[host]
    assert isinstance(h, NetnsHost), h
    return Path(h.agent_config().dir, "hostd.log").read_text()


def test_a_ticket_grants_one_move_and_nothing_else(vclab: str, tmp_path: Path) -> None:
    """Issue 17's attacks, over real SSH with a real ticket: vc-b admits an incoming VM for vc-a (signed as vc-a,
    as a relocate does) and hands back the ticket; with it, raw QMP, another VM, `disk.import` of /etc/shadow
    and the names '/' and '../x' are each refused, and nothing on esx-b1 changed (asked with the lab operator's
    key). After the abort, the ticket's connection can do nothing and a new one is not let in."""
    from testbed.errors import Forbidden, InputError, TestbedError
    from testbed.qemu.spec import BootSpec, DiskSpec, NicSpec, VmSpec
    from testbed.vcenter import hostconn
    cfg_a = deploy.config_of(vclab, "vc-a")
    host = labctl.hosts_of(builder.load_state(vclab))["esx-b1"]

    async def on_host() -> dict[str, Any]:
        """esx-b1 as its operator sees it: VMs, disks (with digests), tickets on file."""
        async with await host.agent() as ag:
            dss = await ag.call("datastore.list")
            disks = {(d["name"], f): (await ag.call("disk.digest", datastore=d["name"], file=f))
                     for d in dss for f in d.get("disks", [])}
            return {"vms": sorted(v["name"] for v in await ag.call("vm.list")), "disks": disks}

    spec = VmSpec(name="intruder", memory_bytes=128 * 2**20,
                  boot=BootSpec(kernel="/nonexistent/vmlinuz", initrd="/nonexistent/initrd", builtin=True),
                  disks=(DiskSpec(datastore="ds-esx-a1", file="intruder-disk0.qcow2", size_bytes=64 * 2**20),),
                  nics=(NicSpec(port_group="VM Network", mac="52:54:00:00:0e:01"),))
    with client(vclab, "vc-b") as b:
        trust_as(vclab, "vc-a", b)
        b.post("/api/vcenter/vm", {"name": "bystander", "placement": {"host": "esx-b1"}, "memory": "128M",
                                   "disk": "64M", "power_on": False})
        b.peer, b.audience = ("vc-a", cfg_a.key), "vc-b"
        try:
            before = asyncio.run(on_host())
            adm = b.post("/api/testbed/xvmotion/admit", {
                "vm": {"name": "intruder", "spec": spec.model_dump(mode="json")}, "host": "esx-b1",
                "source_vcenter": "vc-a", "move_timeout_s": 600}, signed=True)
            station = host.ssh_target().from_netns      # the test reaches the lab from the operator's station

            class StationTicket(hostconn.TicketHost):
                def ssh_target(self) -> Any:
                    return dataclasses.replace(super().ssh_target(), from_netns=station)
            ticket = StationTicket(adm["ticket"], tmp_path)
            by = [d["file"] for d in b.get("/api/vcenter/vm/bystander")["disks"]][0]

            async def attack() -> None:
                async with await ticket.agent() as t:
                    assert await t.call("host.ping")                   # what a move needs: allowed
                    attempts: list[tuple[str, dict[str, Any]]] = [
                        ("vm.qmp", {"name": "intruder", "command": "human-monitor-command",
                                    "arguments": {"command-line": "info status"}}),
                        ("vm.status", {"name": "bystander"}), ("vm.remove", {"name": "bystander"}),
                        ("disk.delete", {"datastore": adm["datastore"], "file": by}),
                        ("disk.import", {"datastore": adm["datastore"], "file": "intruder-disk0.qcow2",
                                         "source": "/etc/shadow"}),
                        ("vm.start", {"spec": spec.model_copy(update={"name": "bystander"}).model_dump(mode="json")}),
                        ("ticket.grant", {"scope": {}}), ("host.counters", {}),
                    ]
                    for method, params in attempts:
                        with pytest.raises(Forbidden) as e:
                            await t.call(method, **params)
                        assert method in str(e.value) and adm["id"] in str(e.value), str(e.value)
                    for bad in ("/", "../x", "intruder/../bystander"):
                        with pytest.raises((Forbidden, InputError)):
                            await t.call("vm.remove", name=bad)
                    facts = await t.call("host.facts")
                    assert "bystander" not in json.dumps(facts), "a ticket sees only its own VM and disks"
                    b.post(f"/api/testbed/xvmotion/{adm['id']}/abort", signed=True)
                    with pytest.raises(Forbidden, match="not granted|revoked"):   # its open connection: nothing more
                        await t.call("host.ping")
                with pytest.raises(TestbedError):                              # and no new one
                    async with await ticket.agent() as t2:
                        await t2.call("host.ping")
            asyncio.run(attack())
            after = asyncio.run(on_host())
            assert after == before, "the ticket changed esx-b1"
            assert inventory_host(vclab, "vc-b", "intruder") is None
            # nothing secret in what either side keeps for people to read: the ticket's private key, the
            # session token (events, the vCenters' logs, the host agent's log)
            secret_lines = [ln for ln in adm["ticket"]["private_key"].splitlines() if len(ln) > 40]
            agent_log = asyncio.run(_agent_log(vclab, "esx-b1"))
            for where, text in [("vc-b events", json.dumps(b.get("/api/testbed/events"))),
                                ("vc-b log", deploy.config_of(vclab, "vc-b").log.read_text()),
                                ("vc-a log", cfg_a.log.read_text()), ("esx-b1 hostd.log", agent_log)]:
                assert not any(ln in text for ln in secret_lines), f"the ticket's key is in {where}"
                assert str(b.token) not in text, f"a session token is in {where}"
        finally:
            b.peer, b.audience = None, None
            with contextlib.suppress(TestbedError):
                b.delete("/api/vcenter/vm/bystander")


def test_a_vm_speaking_for_another_is_counted_not_believed(vclab: str, app1: str) -> None:
    """A real guest that claims to be app1 (the user's own kernel, the built-in one from the content library,
    told `tb.vm=app1` from an address of the VM network that is not app1's): the observer counts its
    heartbeats under 'spoofed' and keeps them out of app1's figures, which still come from app1 alone."""
    from testbed.lab import topology as topo
    from testbed.paths import GUEST_IMAGE_DIR
    cfg = deploy.config_of(vclab, "vc-a")
    fake = topo.vm_address(cfg.site_index * cfg.vm_ip_pool + cfg.vm_ip_pool - 1)     # the pool's last: unused
    fake_ip = fake.split("/")[0]
    sock = builder.LabPaths(vclab).observer_socket

    def stats(since_s: float) -> dict[str, Any]:
        return dict(asyncio.run(obs.query(sock, {"op": "stats", "vm": app1, "since_s": since_s})))

    def spoofed() -> int:
        return int(asyncio.run(obs.query(sock, {"op": "vms"}))["spoofed"].get(app1, {}).get(fake_ip, 0))

    with client(vclab, "vc-a") as c:
        bound = asyncio.run(obs.query(sock, {"op": "bindings"}))["bindings"]
        assert bound.get(app1) == c.get(f"/api/vcenter/vm/{app1}")["ip"].split("/")[0], bound
        for item, f in (("mimic-vmlinuz", "vmlinuz"), ("mimic-initrd", "initrd.img")):
            c.post("/api/testbed/images", params={"name": item}, upload=GUEST_IMAGE_DIR / f)
        try:
            seq0 = stats(time.monotonic() - 1)["last"]["seq"]
            t0 = time.monotonic()
            c.post("/api/vcenter/vm", {
                "name": "mimic", "placement": {"host": "esx-a2"}, "memory": "128M", "kernel": "mimic-vmlinuz",
                "initrd": "mimic-initrd", "append": f"console=ttyS0 tb.vm={app1} tb.ip={fake} "
                                                    f"tb.observer={topo.OBSERVER_IP}:{topo.OBSERVER_PORT}"})
            deadline = time.monotonic() + 120       # the guest boots under TCG: as long as it takes, within reason
            while spoofed() < 500 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert spoofed() >= 500, f"the mimic's heartbeats were not counted as spoofed: {spoofed()}"
            st = stats(t0)
            assert fake_ip not in st["sources"], st["sources"]          # none of them reached app1's track
            assert st["spoofed"] >= 500
            # app1's own sequence goes on from where it was (the mimic's starts at 1): its figures are its own
            assert st["last"]["seq"] > seq0 and st["first"]["seq"] > seq0 - 2000, (seq0, st["first"], st["last"])
            assert not [g for g in st["gaps"] if g["seq_after"] < g["seq_before"]], st["gaps"]
        finally:
            with contextlib.suppress(NotFound):
                c.delete("/api/vcenter/vm/mimic")
            for item in ("mimic-vmlinuz", "mimic-initrd"):
                with contextlib.suppress(NotFound):
                    c.delete(f"/api/testbed/images/{item}")


def test_a_captured_signed_call_cannot_be_replayed(vclab: str) -> None:
    """A signed peer call (vc-a's admission status query at vc-b), captured whole and sent again: the first is
    answered (404: no such admission, the signature was accepted), the replay is a 403 and vc-b records it."""
    cfg_a = deploy.config_of(vclab, "vc-a")
    with client(vclab, "vc-b") as b:
        trust_as(vclab, "vc-a", b)
        b.peer, b.audience = ("vc-a", cfg_a.key), "vc-b"
        path = "/api/testbed/xvmotion/0123456789abcdef"
        captured = {**b._signature("GET", path, b""), "vmware-api-session-id": str(b.token)}
        b.peer, b.audience = None, None
        n_events = len(b.get("/api/testbed/events"))
        first = b.http.get(b.url + path, headers=captured, timeout=30)
        again = b.http.get(b.url + path, headers=captured, timeout=30)
        assert first.status_code == 404, first.text
        assert again.status_code == 403 and "nonce" in again.text, again.text
        refused = [e for e in b.get("/api/testbed/events")[n_events:] if e["kind"] == "PeerCallRefusedEvent"]
        assert len(refused) == 1 and "replay" in json.dumps(refused[0]), refused
        assert captured["X-Testbed-Signature"] not in json.dumps(refused), "a signature reached the event log"


# --- the move itself ----------------------------------------------------------------------------

def test_relocate_across_vcenters_end_to_end(vclab: str, app1: str, capsys: pytest.CaptureFixture[str]) -> None:
    phases: list[str] = []
    with client(vclab, "vc-a") as c:
        tid = c.post(f"/api/vcenter/vm/{app1}", {"spec": dest_spec(vclab)}, params={"action": "relocate"})["task"]
        t = c.wait_task(tid, timeout_s=300, on_update=lambda t: phases.append(t["progress"].get("phase", "")))
        events_a = [e for e in c.get("/api/testbed/events", params={"vm": app1})]
    r = t["result"]
    with capsys.disabled():
        print(f"\ncross-vCenter relocate: {r['total_s']:.2f} s engine, downtime reported "
              f"{r['downtime_ms']['reported']} ms, observed {r['downtime_ms']['observed']} ms; "
              f"task {t['end_time'] - t['start_time']:.2f} s")
    assert t["status"] == "SUCCEEDED", t["error"]
    assert all(ch["status"] != "error" for ch in t["prechecks"])
    assert r["integrity"]["memory"] == "verified" and r["integrity"]["disk"] == "verified"
    assert r["source"]["vcenter"] == "vc-a" and r["destination"]["vcenter"] == "vc-b"
    assert {"trust", "prechecks", "memory-precopy"} <= set(phases), phases
    assert running_on(vclab, app1) == ["esx-b1"]
    assert inventory_host(vclab, "vc-b", app1) == "esx-b1"
    assert inventory_host(vclab, "vc-a", app1) is None
    with client(vclab, "vc-b") as b:
        info = b.get(f"/api/vcenter/vm/{app1}")
        assert [h["vcenter"] for h in info["history"]] == ["vc-a", "vc-b"]
        events_b = b.get("/api/testbed/events", params={"vm": app1})
        trusts_b = {x["name"] for x in b.get("/api/testbed/trust")}
    assert any(e["kind"] == "VmMigratedEvent" for e in events_a), "the source keeps the VM's history"
    assert any(e["kind"] == "VmBeingMigratedEvent" for e in events_b)
    assert any(e["kind"] == "VmMigratedEvent" for e in events_b)
    assert "vc-a" in trusts_b
    for vc in ("vc-a", "vc-b"):
        with client(vclab, vc) as cl:
            rec = cl.post("/api/testbed/reconcile")
        assert rec["problems"] == [] and rec["unreachable_hosts"] == [], rec


def _migration_status(lab: str, host: str, vm: str) -> str:
    async def ask() -> str:
        async with await labctl.hosts_of(builder.load_state(lab))[host].agent() as agent:
            return str((await agent.call("vm.qmp", name=vm, command="query-migrate")).get("status", "none"))
    return asyncio.run(ask())


def test_vcenter_killed_mid_relocate_resolves_honestly(vclab: str, app1: str) -> None:
    """Move app1 back (vc-b -> vc-a) over a slow link; SIGKILL vc-b in pre-copy; restart it at the worst moment.

    The worst moment: the source finished the migration on its own while vc-b was down, and the destination has
    not resumed the guest yet (its agent is held with SIGSTOP, as a busy host holds it for a while). A recovery
    that resumed the source then left two running copies once the destination resumed too."""
    assert inventory_host(vclab, "vc-b", app1) == "esx-b1", "runs after the end-to-end test"
    labctl.set_link(vclab, change_bandwidth=True, bandwidth_bps=24 * 2**20)
    try:
        spec = dest_spec(vclab, vc="vc-a")
        spec["placement"] = {"host": "esx-a1"}
        with client(vclab, "vc-b") as b:
            tid = b.post(f"/api/vcenter/vm/{app1}", {"spec": spec}, params={"action": "relocate"})["task"]
            deadline = time.monotonic() + 120
            while b.get(f"/api/cis/tasks/{tid}")["progress"].get("phase") not in ("memory-precopy",):
                assert time.monotonic() < deadline, "the relocate never reached pre-copy"
                time.sleep(0.2)
        print("\n" + deploy.stop(vclab, "vc-b", kill=True))
        rec = next(p for p in builder.load_state(vclab).processes if p.role == "hostd esx-a1")
        assert record_alive(rec), rec
        agent_a1 = rec.pid
        os.kill(agent_a1, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 150
            while (status := _migration_status(vclab, "esx-b1", app1)) != "completed":
                assert status in ("active", "setup", "device", "pre-switchover"), f"the source's migration: {status}"
                assert time.monotonic() < deadline, "the source did not complete the migration on its own in 150 s"
                time.sleep(0.5)
            deploy.start(vclab, "vc-b")
            time.sleep(3)
        finally:
            os.kill(agent_a1, signal.SIGCONT)
        with client(vclab, "vc-b") as b:
            t = b.wait_task(tid, timeout_s=240)
    finally:
        labctl.set_link(vclab, change_bandwidth=True, bandwidth_bps=None)
    print(f"after the restart: {t['status']}; " + " | ".join(t["notes"]))
    assert any("restarted during this task" in n for n in t["notes"])
    where = running_on(vclab, app1)
    assert len(where) == 1, f"the VM runs on exactly one host, not {where}"
    in_a, in_b = inventory_host(vclab, "vc-a", app1), inventory_host(vclab, "vc-b", app1)
    if t["status"] == "SUCCEEDED":
        assert where == ["esx-a1"] and in_a == "esx-a1" and in_b is None
        # the engine's checks never ran: unverified, and vc-b keeps the paused source copy until told
        assert t["verdict"] == "unverified", t
        with client(vclab, "vc-b") as b:
            kept = b.get("/api/testbed/source-copies")
            assert [(k["vm"], k["host"]) for k in kept] == [(app1, "esx-b1")], kept
            assert any(x["name"] == app1 for x in asyncio.run(_vm_list(vclab, "esx-b1"))), "the copy is there"
            rec_b = b.post("/api/testbed/reconcile")   # a known copy, not a stray VM
            assert rec_b["problems"] == [] and len(rec_b["source_copies"]) == 1, rec_b
        with client(vclab, "vc-a") as a:   # a move back onto the kept copy is stopped by vc-b's prechecks
            back = relocate(a, app1, dest_spec(vclab))
        assert back["status"] == "FAILED"
        assert [c["name"] for c in back["prechecks"] if c["status"] == "error"] == ["source-copy"], back
        assert running_on(vclab, app1) == ["esx-a1"]
        with client(vclab, "vc-b") as b:
            gone = b.delete(f"/api/testbed/source-copies/{app1}")
            assert gone["host"] == "esx-b1" and gone["removed"], gone
            assert b.get("/api/testbed/source-copies") == []
        assert not any(x["name"] == app1 for x in asyncio.run(_vm_list(vclab, "esx-b1")))
    else:
        assert where == ["esx-b1"] and in_b == "esx-b1" and in_a is None
        assert "rolled back" in t["error"]["message"]
    for vc in ("vc-a", "vc-b"):
        with client(vclab, vc) as cl:
            rec = cl.post("/api/testbed/reconcile")
        assert rec["problems"] == [], rec


def test_an_unverified_move_exits_2_and_keeps_the_source_copy_until_discarded(vclab: str, tmp_path: Path) -> None:
    """The user's own guest (no agent: its memory cannot be checked) moved with the CLI within vc-a: exit 2, the
    report says unverified with the source copy kept, `vm source-copies` lists it, reconcile does not call it a
    stray, `vm discard-source` removes it; a second discard is a clear error."""
    from testbed.paths import GUEST_IMAGE_DIR

    def cli(*args: str, rc: int = 0) -> str:
        r = subprocess.run([sys.executable, "-m", "testbed.cli", "--lab", vclab, *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == rc, f"exit {r.returncode}: {r.stdout}{r.stderr}"
        return r.stdout + r.stderr
    with client(vclab, "vc-a") as c:     # the user's own kernel and initrd: content library items, not host paths
        for item, f in (("own9-vmlinuz", "vmlinuz"), ("own9-initrd", "initrd.img")):
            c.post("/api/testbed/images", params={"name": item}, upload=GUEST_IMAGE_DIR / f)
        c.post("/api/vcenter/vm", {"name": "own9", "placement": {"host": "esx-a2"}, "memory": "128M", "disk": "64M",
                                   "kernel": "own9-vmlinuz", "initrd": "own9-initrd", "append": "console=ttyS0"})
    try:
        time.sleep(3)
        out = tmp_path / "own9.json"
        said = cli("migrate", "own9", "--to-host", "esx-a1", "--json", str(out), rc=2)
        assert "succeeded, unverified" in said and "discard-source own9" in said, said
        rep = json.loads(out.read_text())
        assert rep["result"] == "unverified" and rep["source_kept"], rep
        assert rep["integrity"]["memory"] == "unverified" and rep["integrity"]["disk"] == "verified", rep
        copies = json.loads(cli("vm", "source-copies", "--json"))
        assert [(x["vm"], x["host"], x["vcenter"]) for x in copies] == [("own9", "esx-a2", "vc-a")], copies
        assert inventory_host(vclab, "vc-a", "own9") == "esx-a1"
        with client(vclab, "vc-a") as c:
            rec = c.post("/api/testbed/reconcile")
        assert rec["problems"] == [] and len(rec["source_copies"]) == 1, rec
        assert "discarded" in cli("vm", "discard-source", "own9")
        assert json.loads(cli("vm", "source-copies", "--json")) == []
        assert "keeps a source copy of VM 'own9'" in cli("vm", "discard-source", "own9", rc=1)
        assert not any(x["name"] == "own9" for x in asyncio.run(_vm_list(vclab, "esx-a2")))
    finally:
        with client(vclab, "vc-a") as c:
            with contextlib.suppress(NotFound):
                c.delete("/api/vcenter/vm/own9")
            for item in ("own9-vmlinuz", "own9-initrd"):
                with contextlib.suppress(NotFound):
                    c.delete(f"/api/testbed/images/{item}")


def test_enhanced_linked_mode(lab_env: Path) -> None:
    """Both vCenters in one SSO domain: a token of one is valid at the other, trust is configured
    once (at install), and a relocate needs no destination credentials."""
    name = unique_lab_name()
    asyncio.run(deploy.up(vc_topology(name, linked=True)))
    try:
        with client(name, "vc-a") as a, client(name, "vc-b", login=False) as b:
            b.token = a.token
            assert b.get("/api/session")["domain"] == "vsphere.local"
            assert {x["name"] for x in a.get("/api/testbed/trust")} == {"vc-b"}
            a.post("/api/vcenter/vm", {"name": "elm1", "placement": {"host": "esx-a1"}, "memory": "128M",
                                       "disk": "64M"})
            wait_heartbeat(name, "elm1")
            url = deploy.config_of(name, "vc-b").url
            t = relocate(a, "elm1", {"placement": {"host": "esx-b1"}, "destination_vcenter": {"url": url}})
        assert t["status"] == "SUCCEEDED", t["error"]
        assert running_on(name, "elm1") == ["esx-b1"] and inventory_host(name, "vc-b", "elm1") == "esx-b1"
        # logout is domain-wide: a session of vc-a logged out at vc-b (or at vc-a) is refused at both
        for where in ("vc-b", "vc-a"):
            with client(name, "vc-a") as a, client(name, "vc-b", login=False) as b, \
                    client(name, "vc-a", login=False) as a2:
                b.token = a2.token = a.token
                assert b.get("/api/session")["issuer"] == "vc-a"      # good at vc-b: checked with its issuer
                (b if where == "vc-b" else a2).logout()
                for c in (a, b):
                    with pytest.raises(ApiError) as e:
                        c.get("/api/session")
                    assert e.value.status == 401, (where, c.url, e.value)
                a.token = None
    finally:
        labctl.down(name)


def test_requests_never_use_the_environments_proxy(vclab: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://192.0.2.1:9")   # TEST-NET: would fail if it were used
    with client(vclab, "vc-a") as c:
        assert isinstance(c.http, requests.Session) and c.get("/api/session")["vcenter"] == "vc-a"


def test_cli_speaks_to_the_vcenters(vclab: str, app1: str, tmp_path: Path) -> None:
    def cli(*args: str) -> Any:
        r = subprocess.run([sys.executable, "-m", "testbed.cli", "--lab", vclab, *args],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})
        assert r.returncode == 0, r.stderr + r.stdout
        return json.loads(r.stdout) if "--json" in args else r.stdout
    vcs = cli("vcenter", "list", "--json")
    assert [v["name"] for v in vcs] == ["vc-a", "vc-b"] and all(v["running"] for v in vcs)
    vms = {v["name"]: v for v in cli("vm", "list", "--json")}
    assert vms[app1]["power_state"] == "POWERED_ON" and vms[app1]["heartbeat_age_s"] < 1
    tasks = cli("task", "list", "--json")
    assert all({"id", "operation", "status", "progress"} <= set(t) for t in tasks)
    table = cli("task", "list")
    assert "verdict" in table and "prechecks" in table, table
    assert "no source copies kept" in cli("vm", "source-copies")
    out = tmp_path / "outcome.json"
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "--lab", vclab, "relocate", app1, "--dest-vcenter",
                        "https://vc-x.nowhere.test", "--dest-thumbprint", ":".join(["00"] * 32),
                        "--dest-host", "esx-b1", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "cannot reach vCenter https://vc-x.nowhere.test" in r.stdout + r.stderr
    said = json.loads(out.read_text())          # --json on every exit: here the task's outcome (no move ran)
    assert said["status"] == "FAILED" and "cannot reach vCenter" in said["error"]["message"], said
