"""The content library: VMs name library items, never host paths. The real API (``api.create_app``) on a real
``VCenter`` through FastAPI's test client, real ``qemu-img`` on files in a tmp dir, and a real host agent on a
UNIX socket (no QEMU) for the agent's side: ``disk.import`` and boot files only from its import directories,
``-f`` on every qemu-img call, images with a backing file refused."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from testbed.hostd import datastore
from testbed.hostd.config import DatastoreConfig, HostConfig
from testbed.hostd.server import HostAgent
from testbed.names import check_item_name, item_name_ok
from testbed.qemu import images
from testbed.qemu.spec import BootSpec, NicSpec, VmSpec
from testbed.vcenter import sso
from testbed.vcenter.api import create_app
from testbed.vcenter.config import VcenterConfig
from testbed.vcenter.service import VCenter

MiB = 2**20
ADMIN = "administrator@vsphere-t.local"


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def kernel_bytes() -> bytes:
    """Enough of a bzImage for the header probe: 'HdrS' at 0x202."""
    b = bytearray(8192)
    b[0x202:0x206] = b"HdrS"
    return bytes(b)


@pytest.fixture
def api(vc_config: VcenterConfig) -> Iterator[tuple[TestClient, VCenter]]:
    vc = VCenter(vc_config)
    vc.inv.put_user(ADMIN, sso.hash_password("pw"), "Admin")
    vc.inv.put_user("reader@vsphere-t.local", sso.hash_password("pw"), "ReadOnly")
    token, _ = sso.issue(vc.secret, ADMIN, vc_config.sso_domain, 600, issuer=vc_config.name)
    with TestClient(create_app(vc, recover=False), headers={"vmware-api-session-id": token}) as c:
        yield c, vc


def add(c: TestClient, name: str, data: bytes, **params: str) -> Any:
    return c.post("/api/testbed/images", params={"name": name, **params}, content=data,
                  headers={"Content-Type": "application/octet-stream"})


def message(r: Any) -> str:
    return str(r.json()["messages"][0]["default_message"])


def library_files(vc: VCenter) -> list[str]:
    return sorted(str(p.relative_to(vc.cfg.library)) for p in vc.cfg.library.rglob("*") if p.is_file())


# --- adding, listing, removing ----------------------------------------------------------------------------

def test_an_added_item_is_copied_in_with_its_digest_kind_and_format(api: tuple[TestClient, VCenter],
                                                                      tmp_path: Path) -> None:
    c, vc = api
    disk = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    data = disk.read_bytes()
    r = add(c, "disk.qcow2", data)
    assert r.status_code == 201, r.text
    item = r.json()
    assert item["sha256"] == hashlib.sha256(data).hexdigest()
    assert (item["kind"], item["format"], item["size_bytes"], item["virtual_size_bytes"]) == \
        ("disk", "qcow2", len(data), 16 * MiB)
    assert item["added_by"] == ADMIN and item["added_s"] > 0
    copy = vc.cfg.library_items / "disk.qcow2"
    assert copy.read_bytes() == data and copy.resolve() != disk.resolve()
    disk.write_bytes(b"changed where it was")           # copied, not referenced
    assert copy.read_bytes() == data
    assert [i["name"] for i in c.get("/api/testbed/images").json()] == ["disk.qcow2"]
    for name, blob, kind in (("vmlinuz", kernel_bytes(), "kernel"), ("initrd.img", b"070701" + bytes(600), "initrd"),
                             ("plain.raw", bytes(MiB), "disk")):
        r = add(c, name, blob)
        assert r.status_code == 201 and r.json()["kind"] == kind and r.json()["format"] == "raw", r.text
    assert add(c, "vmlinuz", kernel_bytes()).status_code == 409          # names are unique
    assert library_files(vc) == ["catalog.json", "items/disk.qcow2", "items/initrd.img", "items/plain.raw",
                                 "items/vmlinuz"], "no upload left behind"
    assert c.delete("/api/testbed/images/plain.raw").status_code == 204
    assert not (vc.cfg.library_items / "plain.raw").exists()
    assert c.delete("/api/testbed/images/plain.raw").status_code == 404
    assert [e["kind"] for e in vc.inv.events()].count("LibraryItemAddedEvent") == 4


def test_a_qcow2_with_a_backing_file_is_refused_and_nothing_is_kept(api: tuple[TestClient, VCenter],
                                                                     tmp_path: Path) -> None:
    c, vc = api
    x = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(x))
    r = add(c, "x.qcow2", x.read_bytes())
    assert r.status_code == 400, r.text
    assert "backing file" in message(r) and "/etc/hostname" in message(r), message(r)
    assert "qemu-img convert" in r.json()["hint"]
    assert c.get("/api/testbed/images").json() == [] and library_files(vc) == []


def test_a_qcow2_with_an_external_data_file_is_refused(api: tuple[TestClient, VCenter], tmp_path: Path) -> None:
    c, _ = api
    x = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(x), "1M")
    r = add(c, "x.qcow2", x.read_bytes())
    assert r.status_code == 400 and "data file" in message(r), r.text


@pytest.mark.parametrize("fmt", ["vmdk", "vdi", "vpc"])
def test_an_image_of_another_format_is_refused(api: tuple[TestClient, VCenter], tmp_path: Path, fmt: str) -> None:
    c, vc = api
    x = tmp_path / f"x.{fmt}"
    qemu_img("create", "-q", "-f", fmt, str(x), "1M")
    r = add(c, "x.img", x.read_bytes())
    assert r.status_code == 400, r.text
    assert f"format is {fmt}" in message(r) and "qcow2 and raw" in message(r), message(r)
    assert library_files(vc) == []


def test_a_kernel_kind_for_a_qcow2_and_an_empty_upload_are_refused(api: tuple[TestClient, VCenter],
                                                                   tmp_path: Path) -> None:
    c, _ = api
    x = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(x), "1M")
    r = add(c, "k", x.read_bytes(), kind="kernel")
    assert r.status_code == 400 and "a kernel is a raw file" in message(r), r.text
    r = add(c, "e", b"")
    assert r.status_code == 400 and "empty" in message(r), r.text


@pytest.mark.parametrize("name", ["/etc/shadow", "../x", "..", "a..b", "A", "-x", ".hidden", "a/b", "x" * 64, ""])
def test_a_bad_item_name_is_a_400(api: tuple[TestClient, VCenter], name: str) -> None:
    c, vc = api
    r = add(c, name, kernel_bytes())
    assert r.status_code == 400, r.text
    assert library_files(vc) == []
    assert not item_name_ok(name)


def test_the_item_name_rule() -> None:
    for ok in ("vmlinuz", "initrd.img", "debian-12_generic.qcow2", "0day", "x" * 63):
        assert check_item_name(ok) == ok
    assert not item_name_ok("a\n") and not item_name_ok(None)


def test_only_an_administrator_changes_the_library(api: tuple[TestClient, VCenter]) -> None:
    c, vc = api
    assert add(c, "vmlinuz", kernel_bytes()).status_code == 201
    token, _ = sso.issue(vc.secret, "reader@vsphere-t.local", vc.cfg.sso_domain, 600, issuer=vc.cfg.name)
    h = {"vmware-api-session-id": token}
    r = c.post("/api/testbed/images", params={"name": "other"}, content=kernel_bytes(), headers=h)
    assert r.status_code == 403 and "may not change the content library" in message(r), r.text
    assert c.delete("/api/testbed/images/vmlinuz", headers=h).status_code == 403
    assert c.get("/api/testbed/images", headers=h).status_code == 200      # reading is for every user
    assert [i["name"] for i in c.get("/api/testbed/images").json()] == ["vmlinuz"]


# --- VMs name items ------------------------------------------------------------------------------------------

def create(c: TestClient, **own: str) -> Any:
    return c.post("/api/vcenter/vm", json={"name": "own1", "placement": {"host": "esx-t1"}, "memory": "128M",
                                           **own})


@pytest.mark.parametrize("own", [{"image": "/etc/shadow"}, {"kernel": "/etc/shadow"},
                                 {"kernel": "vmlinuz", "initrd": "../x"}])
def test_a_host_path_as_a_vms_kernel_or_image_is_a_400(api: tuple[TestClient, VCenter], own: dict[str, str]) -> None:
    c, vc = api
    r = create(c, **own)
    assert r.status_code == 400, r.text
    assert "not a content library item name" in message(r) and "testbed image list" in message(r), message(r)
    assert vc.inv.vms() == []


@pytest.mark.parametrize("own", [{"image": "nope.qcow2"}, {"kernel": "nope"}, {"kernel": "vmlinuz", "initrd": "nope"}])
def test_a_vm_naming_a_missing_item_is_a_404_with_a_hint(api: tuple[TestClient, VCenter],
                                                         own: dict[str, str]) -> None:
    c, vc = api
    assert add(c, "vmlinuz", kernel_bytes()).status_code == 201
    r = create(c, **own)
    assert r.status_code == 404, r.text
    assert "has no item 'nope" in message(r) and "testbed image list" in r.json()["hint"], r.text
    assert vc.inv.vms() == []


def test_a_vm_naming_an_item_of_the_wrong_kind_is_a_400(api: tuple[TestClient, VCenter]) -> None:
    c, _ = api
    assert add(c, "plain.raw", bytes(MiB)).status_code == 201
    r = create(c, kernel="plain.raw")
    assert r.status_code == 400 and "is a disk, not a kernel" in message(r), r.text
    r = create(c, initrd="plain.raw")
    assert r.status_code == 400 and "needs a kernel" in message(r), r.text


def test_an_item_changed_after_it_was_added_is_refused(api: tuple[TestClient, VCenter]) -> None:
    c, vc = api
    assert add(c, "vmlinuz", kernel_bytes()).status_code == 201
    (vc.cfg.library_items / "vmlinuz").write_bytes(kernel_bytes() + b"!")
    r = create(c, kernel="vmlinuz")
    assert r.status_code == 409 and "changed since it was added" in message(r), r.text


def test_an_item_that_resolves_outside_the_library_is_refused(api: tuple[TestClient, VCenter]) -> None:
    """Someone swapped the item's file for a link to a host file: never handed to a host."""
    c, vc = api
    assert add(c, "vmlinuz", kernel_bytes()).status_code == 201
    item = vc.cfg.library_items / "vmlinuz"
    item.unlink()
    item.symlink_to("/etc/hostname")
    r = create(c, kernel="vmlinuz")
    assert r.status_code == 400 and "resolves outside the library" in message(r), r.text


async def test_create_vm_hands_the_host_the_items_path_inside_the_library(vc: VCenter) -> None:
    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        yield data
    await vc.add_image("vmlinuz", chunks(kernel_bytes()))
    await vc.add_image("initrd.img", chunks(b"\x1f\x8b" + bytes(100)))
    k, i, im, fmt = await vc._own_guest("vmlinuz", "initrd.img", None)
    assert (k, i, im, fmt) == (str((vc.cfg.library_items / "vmlinuz").resolve()),
                               str((vc.cfg.library_items / "initrd.img").resolve()), None, None)
    vc.inv.put_vm({"name": "own1", "host": "esx-t1", "state": "registered", "ip": None,
                   "spec": {"boot": {"kernel": k, "initrd": i}}})
    with pytest.raises(Exception, match="is the kernel or initrd of VM own1"):
        vc.remove_image("initrd.img")


# --- the agent's side ----------------------------------------------------------------------------------------

class Agent:
    def __init__(self, agent: HostAgent, cfg: HostConfig, tmp: Path, library: Path) -> None:
        self.agent, self.cfg, self.tmp, self.library = agent, cfg, tmp, library
        self.qemu_img_calls: list[tuple[str, ...]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(self.cfg.socket))
        try:
            writer.write((json.dumps({"id": 1, "method": method, "params": params}) + "\n").encode())
            await writer.drain()
            return dict(json.loads(await asyncio.wait_for(reader.readline(), 30)))
        finally:
            writer.close()


@pytest.fixture
async def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Agent]:
    library = tmp_path / "library" / "items"
    library.mkdir(parents=True)
    (tmp_path / "ds1").mkdir()
    cfg = HostConfig(name="esx-t1", dir=str(tmp_path / "host"), qemu_binary=str(tmp_path / "no-qemu"),
                     datastores=(DatastoreConfig(name="ds1", path=str(tmp_path / "ds1"), capacity_bytes=256 * MiB),),
                     port_groups={"VM Network": "pg0"}, import_dirs=(str(library),),
                     guest_image_dir=str(tmp_path / "guest"))
    a = HostAgent(cfg)
    a._facts_cache = {"qemu_version": "10.0", "machine_types": ["pc-q35-10.0"], "machine_aliases": {}}
    server = await asyncio.start_unix_server(a.client, path=str(cfg.socket))
    ag = Agent(a, cfg, tmp_path, library)
    real = datastore.qemu_img

    async def recording(*args: str, host: str) -> str:
        ag.qemu_img_calls.append(args)
        return await real(*args, host=host)
    monkeypatch.setattr(datastore, "qemu_img", recording)
    try:
        yield ag
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


def error(r: dict[str, Any], kind: str) -> str:
    assert r.get("error", {}).get("kind") == kind, r
    return str(r["error"]["message"])


async def test_disk_import_of_a_file_outside_the_import_dirs_is_refused(agent: Agent) -> None:
    outside = agent.tmp / "elsewhere.raw"
    outside.write_bytes(bytes(MiB))
    (agent.library / "link.raw").symlink_to(outside)          # a link out of the library counts as outside
    for source in ("/etc/shadow", "/etc/hostname", str(outside), str(agent.library / "link.raw"),
                   str(agent.library / ".." / ".." / "elsewhere.raw"), str(agent.library)):
        msg = error(await agent.call("disk.import", datastore="ds1", file="own1-disk0.qcow2", source=source),
                    "Forbidden")
        assert "outside the directories host esx-t1 imports from" in msg, msg
    assert list((agent.tmp / "ds1").iterdir()) == []
    assert agent.qemu_img_calls == [], "refused before qemu-img ever saw the file"


async def test_disk_import_refuses_a_backing_file_and_passes_f_always(agent: Agent) -> None:
    bad = agent.library / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(bad))
    msg = error(await agent.call("disk.import", datastore="ds1", file="own1-disk0.qcow2", source=str(bad)),
                "InputError")
    assert "backing file" in msg and "/etc/hostname" in msg, msg
    assert list((agent.tmp / "ds1").iterdir()) == []
    good = agent.library / "good.raw"
    good.write_bytes(b"\xeb\x63" + bytes(2 * MiB - 2))
    r = await agent.call("disk.import", datastore="ds1", file="own1-disk0.qcow2", source=str(good), format="raw")
    assert r["result"]["format"] == "qcow2" and r["result"]["size_bytes"] == 2 * MiB, r
    wrong = await agent.call("disk.import", datastore="ds1", file="own2-disk0.qcow2", source=str(good),
                             format="qcow2")
    assert "is raw, not qcow2" in error(wrong, "InputError")
    assert agent.qemu_img_calls, "qemu-img was used"
    for args in agent.qemu_img_calls:
        assert "-f" in args, f"qemu-img {' '.join(args)} without -f: qemu-img would guess the format"
    assert ("convert", "-q", "-f", "raw", "-O", "qcow2", str(good),
            str(agent.tmp / "ds1" / "own1-disk0.qcow2")) in agent.qemu_img_calls


async def test_a_raw_disk_the_guest_made_look_like_a_qcow2_stays_raw(agent: Agent) -> None:
    """A raw disk's first bytes are the guest's: it writes a qcow2 header naming a backing file; the agent keeps
    reading it as the raw disk it made (its format is recorded), so no host file is ever opened through it."""
    assert "result" in await agent.call("disk.create", datastore="ds1", file="r.raw", size_bytes=MiB, format="raw")
    forged = agent.tmp / "forged.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(forged), "1M")
    path = agent.tmp / "ds1" / "r.raw"
    with path.open("r+b") as f:
        f.write(forged.read_bytes()[:4096])
    assert images.probe_format(path) == "qcow2"            # what a guessing qemu-img would have seen
    info = (await agent.call("disk.info", datastore="ds1", file="r.raw"))["result"]
    assert info["format"] == "raw" and info["size_bytes"] == MiB, info
    facts = (await agent.call("datastore.list"))["result"][0]
    assert facts["disks"] == ["r.raw"] and facts["provisioned_bytes"] == MiB, facts
    assert all("-f" in a for a in agent.qemu_img_calls)


async def test_a_boot_file_outside_the_library_and_the_guest_image_is_refused(agent: Agent) -> None:
    def spec(kernel: str, initrd: str | None = None) -> dict[str, Any]:
        return VmSpec(name="own1", memory_bytes=64 * MiB, boot=BootSpec(kernel=kernel, initrd=initrd),
                      nics=(NicSpec(port_group="VM Network", mac="52:54:00:00:00:01"),)).model_dump(mode="json")
    k = agent.library / "vmlinuz"
    k.write_bytes(kernel_bytes())
    for kernel, initrd in (("/etc/hostname", None), (str(k), "/etc/hostname"),
                           (str(agent.library / ".." / ".." / "etc-like"), None)):
        Path(kernel).parent.mkdir(parents=True, exist_ok=True)
        if not Path(kernel).exists():
            Path(kernel).write_bytes(b"x")
        msg = error(await agent.call("vm.start", spec=spec(kernel, initrd)), "Forbidden")
        assert "outside the directories host esx-t1 boots from" in msg, msg
    r = await agent.call("vm.start", spec=spec(str(k)))      # inside: past the check (then no QEMU binary here)
    assert r.get("error", {}).get("kind") != "Forbidden", r


def test_the_hosts_import_dirs_are_the_vcenters_libraries() -> None:
    """What an embedded lab's hosts import from (``paths.library_items_dir``) is where each vCenter keeps its items."""
    from testbed.paths import library_items_dir
    from testbed.vcenter.deploy import vcenter_dir
    cfg = VcenterConfig(name="vc-a", fqdn="vc-a.t.test", address="198.18.0.2", dir=str(vcenter_dir("t", "vc-a")),
                        sso_domain="vsphere-a.local", lab="t")
    assert cfg.library_items == library_items_dir("t", "vc-a")
    assert cfg.library_items.parent == cfg.library and cfg.library.parent == cfg.path


async def test_an_upload_cut_short_leaves_nothing_after_a_restart(vc_config: VcenterConfig) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"070701" + bytes(100)
        raise ConnectionError("client went away")
    v = VCenter(vc_config)
    with pytest.raises(ConnectionError):
        await v.add_image("initrd.img", broken())
    assert v.library.items_list() == [] and not list(vc_config.library.glob(".upload-*"))
    (vc_config.library / ".upload-1-2").write_bytes(b"left by a crash")       # a vCenter killed mid-upload
    await v.close()
    v = VCenter(vc_config)
    assert v.library.items_list() == [] and not list(vc_config.library.glob(".upload-*"))
    await v.close()
