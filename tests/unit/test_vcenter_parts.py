"""The vCenter's parts that need no lab: SSO tokens and passwords, thumbprints and peer
signatures, the inventory, and the precheck rules."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from testbed.errors import InputError
from testbed.vcenter import certs, prechecks, sso
from testbed.vcenter.inventory import Inventory


def test_passwords_are_hashed_and_checked() -> None:
    h = sso.hash_password("s3cret!")
    assert h.startswith("scrypt$") and "s3cret" not in h
    assert sso.check_password("s3cret!", h)
    assert not sso.check_password("s3cret", h)
    assert not sso.check_password("s3cret!", "plain-text")
    assert sso.hash_password("s3cret!") != h, "salted"


def test_tokens_expire_and_belong_to_their_domain() -> None:
    secret_a, secret_b = b"a" * 32, b"b" * 32
    token, s = sso.issue(secret_a, "administrator@vsphere-a.local", "vsphere-a.local", ttl_s=60, issuer="vc-a")
    got = sso.verify(secret_a, "vsphere-a.local", token)
    assert got.user == "administrator@vsphere-a.local" and got.sid == s.sid
    with pytest.raises(sso.TokenError, match="not issued by SSO domain vsphere-b.local"):
        sso.verify(secret_b, "vsphere-b.local", token)
    expired, _ = sso.issue(secret_a, "u@vsphere-a.local", "vsphere-a.local", ttl_s=-5, issuer="vc-a")
    with pytest.raises(sso.TokenError, match="expired"):
        sso.verify(secret_a, "vsphere-a.local", expired)
    with pytest.raises(sso.TokenError, match="malformed"):
        sso.verify(secret_a, "vsphere-a.local", "garbage")
    payload, sig = token.split(".")
    with pytest.raises(sso.TokenError):
        sso.verify(secret_a, "vsphere-a.local", payload + "x." + sig)


def test_thumbprints_and_peer_signatures(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certs.make_self_signed(cert, key, "vc-a.tb.test", ["vc-a.tb.test"], "198.18.0.2")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    tp = certs.thumbprint_file(cert)
    assert len(tp) == 95 and tp.count(":") == 31
    assert certs.normalize(tp.replace(":", "").lower()) == tp
    with pytest.raises(InputError, match="not a SHA-256"):
        certs.normalize("AB:CD")
    sig = certs.sign(key, b"nonce|vc-a")
    assert certs.verify(cert.read_text(), b"nonce|vc-a", sig)
    assert not certs.verify(cert.read_text(), b"nonce|vc-x", sig)
    other_cert, other_key = tmp_path / "o.pem", tmp_path / "o.key"
    certs.make_self_signed(other_cert, other_key, "vc-x", ["vc-x"], "198.18.9.2")
    assert not certs.verify(other_cert.read_text(), b"nonce|vc-a", sig)


def test_inventory_persists_across_reopen(tmp_path: Path) -> None:
    inv = Inventory(tmp_path / "inv.db")
    inv.put_vm({"name": "web01", "host": "esx-a1", "state": "registered", "spec": {"x": 1}, "ip": "198.19.1.1/16"})
    inv.put_task({"id": "task-1", "kind": "VirtualMachine.relocate", "target": "web01", "state": "RUNNING",
                  "started_s": time.time(), "progress": {"phase": "disk-sync", "percent": 20}})
    inv.event("VmCreatedEvent", "made", vm="web01")
    inv.close()
    inv = Inventory(tmp_path / "inv.db")
    assert inv.vm("web01")["spec"] == {"x": 1}  # type: ignore[index]
    assert [t["id"] for t in inv.tasks(state="RUNNING")] == ["task-1"]
    assert inv.events(vm="web01")[0]["kind"] == "VmCreatedEvent"
    with pytest.raises(ZeroDivisionError):
        with inv.tx() as db:
            db.execute("DELETE FROM vms")
            raise ZeroDivisionError
    assert inv.vm("web01") is not None, "a failed transaction changes nothing"
    inv.close()


def _host(**facts: object) -> dict[str, object]:
    base = {"qemu_version": "10.0.2", "machine_types": ["pc-q35-10.0", "pc-q35-9.2"], "cpu_models": ["qemu64"],
            "port_groups": [{"name": "VM Network"}], "datastores": [{"name": "ds1", "free_bytes": 2**30}]}
    return {"name": "esx-b1", "license": "enterprise-plus", "facts": {**base, **facts}}


VM = {"name": "web01", "machine": "pc-q35-10.0", "cpu_model": "qemu64", "port_groups": ["VM Network"],
      "disk_bytes": 256 * 2**20}


def test_destination_checks_each_rule() -> None:
    ok = {c.name: c for c in prechecks.destination(VM, {"qemu_version": "10.0.2"}, _host(), "ds1", set(),
                                                   vcenter="vc-b")}
    assert all(c.status == "ok" for c in ok.values()), ok
    older = prechecks.destination(VM, {"qemu_version": "10.0.2"},
                                  _host(qemu_version="9.2.0", machine_types=["pc-q35-9.2"]), "ds1", set(),
                                  vcenter="vc-b")
    hc = next(c for c in older if c.name == "host-compatibility")
    assert hc.status == "error" and "older than QEMU 10.0.2" in hc.message and "pc-q35-10.0" in hc.message
    full = next(c for c in prechecks.destination({**VM, "disk_bytes": 2 * 2**30}, {}, _host(), "ds1", set(),
                                                 vcenter="vc-b")
                if c.name == "datastore-space")
    assert full.status == "error" and "1.0 GiB free" in full.message
    pg = next(c for c in prechecks.destination({**VM, "port_groups": ["DMZ"]}, {}, _host(), "ds1", set(),
                                               vcenter="vc-b")
              if c.name == "port-groups")
    assert pg.status == "error" and "'DMZ'" in pg.message and pg.hint
    taken = next(c for c in prechecks.destination(VM, {}, _host(), "ds1", {"web01"}, vcenter="vc-b")
                 if c.name == "vm-name")
    assert taken.status == "error"
    lic = prechecks.license_check("esx-b1", "standard", vcenter="vc-b")
    assert lic.status == "error" and "`testbed vcenter host-license vc-b esx-b1 enterprise-plus`" in (lic.hint or "")
    # the hint's command is one the CLI takes as printed
    from testbed.cli import build_parser
    cmd = (lic.hint or "").split("`")[1].split()[1:]
    ns = build_parser().parse_args(cmd)
    assert (ns.name, ns.host, ns.edition) == ("vc-b", "esx-b1", "enterprise-plus")
    assert prechecks.license_check("esx-b1", "standard", vcenter="vc-b", cross=False).status == "ok"


def test_bandwidth_estimate_warns_when_dirtying_near_the_link() -> None:
    calm = prechecks.bandwidth(512 * 2**20, 2**30, 5e6, 100 * 2**20)
    assert calm.status == "ok" and "about 15 s" in calm.message
    busy = prechecks.bandwidth(512 * 2**20, 2**30, 95e6, 100 * 2**20)
    assert busy.status == "warning" and "may not converge" in busy.message
    assert prechecks.bandwidth(1, 1, None, None).status == "warning"


def test_merge_reports_every_check_once_worst_first_in_a_fixed_order() -> None:
    merged = prechecks.merge([
        prechecks.Check("license", "ok", "a: fine"), prechecks.Check("vm-state", "ok", "running"),
        prechecks.Check("license", "error", "b: standard", "assign enterprise-plus"),
    ])
    assert [c["name"] for c in merged] == ["vm-state", "license"]
    lic = merged[1]
    assert lic["status"] == "error" and lic["message"] == "a: fine; b: standard" and lic["hint"]
    assert prechecks.failed(merged) == [lic]


def test_errors_map_to_the_status_that_fits_and_a_host_failure_is_not_a_500() -> None:
    from testbed import errors
    from testbed.vcenter.api import status_of
    assert status_of(errors.PrecheckFailed("x", checks=[])) == (400, "INVALID_ARGUMENT")
    assert status_of(errors.TokenError("x")) == (401, "UNAUTHENTICATED")
    assert status_of(errors.NotFound("x")) == (404, "NOT_FOUND")
    assert status_of(errors.HostUnreachable("x")) == (503, "SERVICE_UNAVAILABLE")
    assert status_of(errors.HostError("x")) == (503, "SERVICE_UNAVAILABLE")
    assert status_of(errors.AgentError("x", kind="QemuError")) == (503, "SERVICE_UNAVAILABLE")
    assert status_of(errors.ApiError(502, "peer", error_type="X")) == (502, "X")


async def test_vcenter_binds_heartbeats_at_the_labs_observer(vc, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A VM's heartbeats are bound to the address its vCenter gave it; without an observer the VM stays unbound,
    and the vCenter says so in an event (not an error: the VM is still created)."""
    import asyncio

    from testbed.lab import observer as obs

    monkeypatch.setenv("TESTBED_HOME", str(tmp_path / "home"))
    await vc.observe_heartbeats("web01", "198.19.16.3/16")       # no observer in this lab
    ev = [e for e in vc.inv.events() if e["kind"] == "VmHeartbeatBindingFailedEvent"]
    assert len(ev) == 1 and ev[0]["vm"] == "web01" and "unit-no-lab" in ev[0]["message"]
    control = vc.lab_paths.observer_socket
    control.parent.mkdir(parents=True)
    o = obs.Observer(obs.bindings_file(control))
    server = await asyncio.start_unix_server(o.control, path=str(control))
    async with server:
        await vc.observe_heartbeats("web01", "198.19.16.3/16")
        assert o.bindings == {"web01": "198.19.16.3"}
        await vc.observe_heartbeats("web01", None)
        assert o.bindings == {}
    assert len([e for e in vc.inv.events() if e["kind"] == "VmHeartbeatBindingFailedEvent"]) == 1
