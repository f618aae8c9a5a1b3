"""The host agent trusts no name or path (issue 17, item 2): a real agent on a UNIX socket with its full API (the
vCenter's own key), sent names that would leave their directory. Each is refused with the rule, before the
method runs, and nothing on the host changes: the sentinel files beside the agent's directories survive."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from testbed.errors import InputError
from testbed.names import check_datastore_name, check_disk_file, inside
from tests.unit.agentkit import Lab, vm_spec

BAD_VM_NAMES = ["/", "..", "../x", "x/../../etc", "web01/..", ".", "", "Web01", "web01\n", "a" * 40, 7, None]
BAD_FILES = ["/etc/shadow", "..", ".", "../x", "../../etc/passwd", "a/b", ".hidden", "", "x\n", "a" * 200, 1]
BAD_DATASTORES = ["/", "..", "../ds1", "ds1/..", "DS1", "", "ds1\n", 0]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` with its size and mtime: 'nothing changed' made checkable."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def input_error(r: dict[str, Any], *words: str) -> str:
    assert r.get("error", {}).get("kind") == "InputError", r
    msg = str(r["error"]["message"])
    assert all(w in msg for w in words), msg
    return msg


@pytest.fixture
def sentinels(lab: Lab) -> Path:
    """A file beside the agent's own directory and one beside the datastore: what '..' would reach."""
    for p in (lab.tmp / "precious.txt", Path(lab.cfg.dir) / "precious.txt", Path(lab.cfg.vms_dir) / "keep" / "f"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("keep me")
    return lab.tmp


@pytest.mark.parametrize("name", BAD_VM_NAMES)
async def test_vm_remove_of_a_bad_name_is_refused_and_removes_nothing(lab: Lab, sentinels: Path, name: Any) -> None:
    before = snapshot(sentinels)
    c = await lab.connect()
    input_error(await c.send("vm.remove", name=name), "VM name", "not allowed")
    assert snapshot(sentinels) == before


@pytest.mark.parametrize("method", ["vm.status", "vm.kill", "vm.console_log", "vm.qmp", "vm.import_console_history",
                                    "migration.finish", "disk.digest_live"])
async def test_every_method_taking_a_vm_name_checks_it(lab: Lab, sentinels: Path, method: str) -> None:
    before = snapshot(sentinels)
    c = await lab.connect()
    extra: dict[str, Any] = {"vm.qmp": {"command": "query-status"}, "vm.import_console_history": {"text": "x"},
                             "disk.digest_live": {"device": "d0"}}.get(method, {})
    for name in ("/", "../keep", "..", "keep/../../.."):
        msg = str((await c.send(method, name=name, **extra)).get("error", {}).get("message", ""))
        assert "not allowed" in msg or "bad parameters" in msg, (method, name, msg)
    assert snapshot(sentinels) == before


@pytest.mark.parametrize("file", BAD_FILES)
async def test_disk_methods_refuse_a_file_that_leaves_the_datastore(lab: Lab, sentinels: Path, file: Any) -> None:
    before = snapshot(sentinels)
    c = await lab.connect()
    for method, extra in (("disk.create", {"size_bytes": 2**20}), ("disk.delete", {}), ("disk.info", {}),
                          ("disk.digest", {}), ("disk.import", {"source": "/etc/hostname"})):
        input_error(await c.send(method, datastore="ds1", file=file, **extra), "disk file name", "not allowed")
    assert snapshot(sentinels) == before


@pytest.mark.parametrize("ds", BAD_DATASTORES)
async def test_disk_methods_refuse_a_bad_datastore_name(lab: Lab, sentinels: Path, ds: Any) -> None:
    before = snapshot(sentinels)
    c = await lab.connect()
    for method, extra in (("disk.create", {"size_bytes": 2**20}), ("disk.delete", {}), ("disk.info", {})):
        input_error(await c.send(method, datastore=ds, file="x.qcow2", **extra), "datastore name", "not allowed")
    assert snapshot(sentinels) == before


async def test_a_vm_spec_naming_a_disk_outside_the_datastore_is_refused(lab: Lab, sentinels: Path) -> None:
    before = snapshot(sentinels)
    c = await lab.connect()
    spec = vm_spec().model_dump(mode="json")
    spec["disks"][0]["file"] = "../precious.txt"
    input_error(await c.send("vm.start", spec=spec), "disk file name")
    spec = vm_spec().model_dump(mode="json")
    spec["disks"][0]["datastore"] = "../ds1"
    input_error(await c.send("vm.start", spec=spec), "datastore name")
    assert snapshot(sentinels) == before


async def test_a_symlink_planted_in_the_datastore_is_not_followed_out(lab: Lab, sentinels: Path) -> None:
    """A name that is fine by the rule but is a symlink out of the datastore (planted by whoever could write
    there) is refused when the path is resolved: disk.delete must not remove what it points to."""
    ds = lab.tmp / "ds1"
    (ds / "evil.qcow2").symlink_to(lab.tmp / "precious.txt")
    c = await lab.connect()
    input_error(await c.send("disk.delete", datastore="ds1", file="evil.qcow2"), "would leave its directory")
    assert (lab.tmp / "precious.txt").read_text() == "keep me"


async def test_good_names_still_work(lab: Lab) -> None:
    c = await lab.connect()
    r = await c.send("disk.create", datastore="ds1", file="web01.qcow2", size_bytes=2**20)
    assert r.get("result", {}).get("file") == "web01.qcow2", r
    assert (await c.send("disk.delete", datastore="ds1", file="web01.qcow2")).get("error") is None
    assert not (lab.tmp / "ds1" / "web01.qcow2").exists()
    assert (await c.send("vm.remove", name="web01")).get("error", {}).get("kind") == "NotFound"


def test_the_validators_themselves(tmp_path: Path) -> None:
    for f in BAD_FILES:
        with pytest.raises(InputError):
            check_disk_file(f)
    for d in BAD_DATASTORES:
        with pytest.raises(InputError):
            check_datastore_name(d)
    assert check_disk_file("web01-disk0.qcow2") == "web01-disk0.qcow2" and check_datastore_name("ds-a") == "ds-a"
    assert inside(tmp_path, "x", "t") == tmp_path.resolve() / "x"
    for bad in ("..", "../x", "a/b", "/etc", "."):
        with pytest.raises(InputError, match="would leave its directory"):
            inside(tmp_path, bad, "t")
