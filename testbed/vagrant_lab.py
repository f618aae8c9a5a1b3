"""The Vagrant lab from nothing: ``testbed lab vagrant up`` (``make vagrant-lab``) and ``... down``.

``up`` does every step the README used to leave to the user, and says what it did:

1. the box: ``testbed/host`` added to Vagrant from ``images/host/build/testbed-host.box`` if Vagrant does not
   have it (``make vagrant-box`` builds the file);
2. a libvirtd at ``qemu:///system``: the one that runs there, or, where none runs (no systemd, or
   ``libvirt-daemon-system`` not installed), one started like the nested host kind's
   (``testbed.lab.libvirt_host.spawn_libvirtd``: QEMU's output to files, no security driver, QEMU as root;
   a stock ``libvirtd -d`` with its default configuration started no QEMU on this project's machine). One
   it started is recorded in ``$TESTBED_HOME/vagrant/<lab>/vagrant-libvirtd.json`` and stopped by ``down``,
   never another;
3. the domain type: ``kvm`` only if the accelerator probe (``testbed.qemu.accel``) booted a guest under KVM,
   otherwise ``qemu`` (TCG), with the probe's reason; ``TESTBED_VAGRANT_DRIVER`` overrides it;
4. ``vagrant up --provider libvirt`` in the Vagrantfile's directory, its output shown as it comes;
5. ``testbed lab attach --vagrant`` (``testbed.vcenter.attach``): two vCenters with the four hosts added.

``down`` undoes it in reverse: the attached lab (``lab down``), ``vagrant destroy -f``, the libvirtd it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.errors import LabError, NotFound
from testbed.hosts import vagrant as vg
from testbed.lab import builder
from testbed.lab import libvirt_host as lvh
from testbed.lab.state import ProcessRecord, StateFile, record_alive
from testbed.paths import GUEST_IMAGE_DIR, REPO_ROOT, lab_dir, testbed_home
from testbed.qemu import accel

BOX = "testbed/host"
BOX_FILE = REPO_ROOT / "images" / "host" / "build" / "testbed-host.box"
RECORD = "vagrant-libvirtd.json"
UP_TIMEOUT_S = 45 * 60


def _vagrant(vdir: Path, *args: str, **kw: Any) -> str:
    return vg.run(vdir, *args, hint="`testbed lab vagrant down` removes what it made; then try again", **kw)


def _own_dir(lab: str) -> Path:
    """What ``up`` started and ``down`` stops: kept apart from the lab's directory, which ``lab down`` clears."""
    return testbed_home() / "vagrant" / lab


def _record_path(lab: str) -> Path:
    return _own_dir(lab) / RECORD


def _recorded(lab: str) -> ProcessRecord | None:
    try:
        return ProcessRecord.model_validate(json.loads(_record_path(lab).read_text())["libvirtd"])
    except (OSError, ValueError, KeyError):
        return None


def has_box(vdir: Path) -> bool:
    """``vagrant box list --machine-readable``: lines ``ts,target,box-name,NAME``."""
    out = _vagrant(vdir, "box", "list", "--machine-readable", timeout_s=120)
    return any(line.split(",")[2:4] == ["box-name", BOX] for line in out.splitlines() if line.count(",") >= 3)


def choose_driver() -> tuple[str, str]:
    """vagrant-libvirt's domain type and why: ``kvm`` only where a guest really boots under KVM."""
    if os.environ.get("TESTBED_VAGRANT_DRIVER"):
        return os.environ["TESTBED_VAGRANT_DRIVER"], "set by TESTBED_VAGRANT_DRIVER"
    how, why = accel.probe(GUEST_IMAGE_DIR / "vmlinuz", testbed_home() / "accel-probe.json")
    return ("kvm" if how == "kvm" else "qemu"), f"accelerator probe: {how} ({why})"


def ensure_libvirtd(lab: str, say: Callable[[str], None]) -> str:
    """The libvirtd Vagrant will use: the running one, or one started (and recorded) here."""
    conn = lvh.open_connection(lvh.DEFAULT_URI)
    if conn is not None:
        conn.close()
        rec = _recorded(lab)
        ours = rec is not None and record_alive(rec)
        say(f"libvirtd: {'the one this command started before' if ours else 'the one running'} at "
            f"{lvh.DEFAULT_URI}" + (f" (pid {rec.pid})" if ours and rec else ""))
        return "ours" if ours else "theirs"
    if not Path(lvh.LIBVIRTD).exists():
        raise LabError(f"no libvirtd runs at {lvh.DEFAULT_URI} and {lvh.LIBVIRTD} is not installed",
                       hint="run `make setup setup-vagrant`")
    created_run_dir = not lvh.RUN_DIR.exists()
    rec, proc, log = lvh.spawn_libvirtd(_own_dir(lab))
    _record_path(lab).write_text(json.dumps({"libvirtd": rec.model_dump(), "run_dir_created": created_run_dir}))
    lvh.wait_libvirtd(lvh.DEFAULT_URI, proc, log, 30).close()
    say(f"libvirtd: none ran at {lvh.DEFAULT_URI}; started one (pid {rec.pid}; QEMU output to files, no security "
        f"driver, QEMU as root; log {log})")
    return "ours"


POOL = "default"               # the storage pool vagrant-libvirt puts the box's volume and the hosts' disks in
BOX_VOLUME = "testbed-VAGRANTSLASH-host_vagrant_box_image_"   # vagrant-libvirt's name for our box's volumes


def _box_volumes() -> set[str] | None:
    """Our box's volumes in the pool now (vagrant-libvirt uploads one per box added); None: no such pool."""
    lv = lvh._libvirt()
    conn = lvh.open_connection(lvh.DEFAULT_URI)
    if conn is None:
        return None
    try:
        pool = conn.storagePoolLookupByName(POOL)
        if not pool.isActive():
            return set()
        pool.refresh(0)
        return {v for v in pool.listVolumes() if v.startswith(BOX_VOLUME)}
    except lv.libvirtError:
        return None
    finally:
        conn.close()


def _remove_box_volumes(lab: str, say: Callable[[str], None]) -> list[str]:
    """The box's volumes ``up`` recorded as uploaded by its ``vagrant up`` (they pile up otherwise), and the
    pool if ``up`` found none and vagrant-libvirt defined it."""
    lv = lvh._libvirt()
    left: list[str] = []
    up_rec = _own_dir(lab) / "up.json"
    try:
        rec = json.loads(up_rec.read_text())
        pool_ours, ours = bool(rec.get("pool_defined_by_up")), set(rec.get("box_volumes", []))
    except (OSError, ValueError):
        pool_ours, ours = False, set()
    conn = lvh.open_connection(lvh.DEFAULT_URI)
    if conn is None:
        return [f"no libvirtd answers at {lvh.DEFAULT_URI}: the box's volumes in pool {POOL} are left"]
    try:
        try:
            pool = conn.storagePoolLookupByName(POOL)
        except lv.libvirtError:
            return left
        if pool.isActive():
            pool.refresh(0)
            for name in pool.listVolumes():
                if name in ours:
                    try:
                        pool.storageVolLookupByName(name).delete(0)
                        say(f"box volume {name} removed from libvirt pool {POOL}")
                    except lv.libvirtError as err:
                        left.append(f"box volume {name}: {err.get_error_message()}")
        if pool_ours and pool.numOfVolumes() == 0:
            if pool.isActive():
                pool.destroy()
            pool.undefine()
            say(f"libvirt pool {POOL} (defined by vagrant-libvirt for this lab) removed")
    finally:
        conn.close()
    up_rec.unlink(missing_ok=True)
    return left


def up(vdir: Path, lab: str = "vg", say: Callable[[str], None] = print) -> dict[str, Any]:
    """Box, libvirtd, ``vagrant up``, attach; returns what it started and the time of each step."""
    t0 = time.monotonic()
    times: dict[str, float] = {}
    if not (vdir / "Vagrantfile").exists():
        raise NotFound(f"no Vagrantfile in {vdir}", hint="run it from the project's directory (or pass --dir)")
    if StateFile(lab_dir(lab)).exists():
        raise LabError(f"lab {lab!r} is already up or attached",
                       hint="`testbed lab vagrant down` first (or `testbed --lab vg lab down` to detach only)")
    _own_dir(lab).mkdir(parents=True, exist_ok=True)
    if has_box(vdir):
        say(f"box: {BOX} is in Vagrant")
    else:
        if not BOX_FILE.exists():
            raise NotFound(f"the box file {BOX_FILE} is not built", hint="run `make vagrant-box`")
        _vagrant(vdir, "box", "add", "--force", "--name", BOX, str(BOX_FILE), timeout_s=600)
        say(f"box: added {BOX} from {BOX_FILE}")
    times["box_s"] = time.monotonic() - t0
    libvirtd = ensure_libvirtd(lab, say)
    volumes_before = _box_volumes()
    up_rec = _own_dir(lab) / "up.json"
    rec: dict[str, Any] = {"pool_defined_by_up": volumes_before is None, "box_volumes": []}
    if up_rec.exists():   # an earlier `up` of this lab that was not taken down: keep what it recorded
        rec = json.loads(up_rec.read_text())
    up_rec.write_text(json.dumps(rec))
    driver, why = choose_driver()
    say(f"domain type: {driver} ({why})")
    env = {**os.environ, "TESTBED_VAGRANT_DRIVER": driver, "TESTBED_VAGRANT_LAB": lab,
           "LIBVIRT_DEFAULT_URI": lvh.DEFAULT_URI}
    t1 = time.monotonic()
    say("vagrant up --provider libvirt (four L1 hosts" + (", TCG: several minutes" if driver == "qemu" else "") + ")")
    try:
        _vagrant(vdir, "up", "--provider", "libvirt", env=env, timeout_s=UP_TIMEOUT_S, stream=True)
    finally:   # what this `vagrant up` uploaded, for `down` (and only that)
        rec["box_volumes"] = sorted(set(rec["box_volumes"]) | ((_box_volumes() or set()) - (volumes_before or set())))
        up_rec.write_text(json.dumps(rec))
    times["vagrant_up_s"] = time.monotonic() - t1
    from testbed.vcenter.attach import attach
    t2 = time.monotonic()
    timings, entries = asyncio.run(attach(vdir, lab))
    times["attach_s"] = time.monotonic() - t2
    times["total_s"] = time.monotonic() - t0
    return {"lab": lab, "libvirtd": libvirtd, "driver": driver, "driver_why": why, "hosts": sorted(entries),
            "times": times}


def down(vdir: Path, lab: str = "vg", say: Callable[[str], None] = print) -> list[str]:
    """Detach the lab, destroy the Vagrant hosts, stop the libvirtd ``up`` started. Returns what was left."""
    left: list[str] = []
    if StateFile(lab_dir(lab)).exists():
        for f in builder.teardown(lab):
            left.append(f)
        say(f"lab {lab}: vCenters and their networks removed")
    if shutil.which("vagrant") is not None and (vdir / "Vagrantfile").exists():
        conn = lvh.open_connection(lvh.DEFAULT_URI)
        if conn is None:
            left.append(f"no libvirtd answers at {lvh.DEFAULT_URI}: `vagrant destroy` was not run")
        else:
            conn.close()
            env = {**os.environ, "TESTBED_VAGRANT_LAB": lab, "LIBVIRT_DEFAULT_URI": lvh.DEFAULT_URI}
            _vagrant(vdir, "destroy", "-f", env=env, timeout_s=600)
            say("vagrant destroy -f: the Vagrant hosts and their networks removed")
            left += _remove_box_volumes(lab, say)
    rec = _recorded(lab)
    if rec is not None:
        meta = json.loads(_record_path(lab).read_text())
        if record_alive(rec):
            os.kill(rec.pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while record_alive(rec) and time.monotonic() < deadline:
                time.sleep(0.1)
            if record_alive(rec):
                os.kill(rec.pid, signal.SIGKILL)
            say(f"libvirtd (pid {rec.pid}) that `vagrant up` used, started by this command: stopped")
        if meta.get("run_dir_created") and not record_alive(rec):
            shutil.rmtree(lvh.RUN_DIR, ignore_errors=True)
        _record_path(lab).unlink()
    return left
