"""The Vagrant lab from nothing, as the README tells it (slow: four L1 hosts boot under TCG here).

``make setup-vagrant vagrant-box`` (packages, the host image, the box file), then ``testbed lab vagrant up``
with no box in Vagrant and no libvirtd running at qemu:///system: the command adds the box, starts a libvirtd,
chooses the domain type from the KVM probe and says why, runs ``vagrant up`` and attaches the hosts to two
vCenters. The test then asks both vCenters for their hosts (every one connected), and ``testbed lab vagrant
down`` must leave nothing: no Vagrant domain, no ``tb-vg-*`` network, no libvirtd it started, no lab.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.paths import REPO_ROOT

pytestmark = pytest.mark.slow


def sh(*argv: str, timeout_s: float = 3000, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)


def run_testbed(*args: str, timeout_s: float = 3000) -> subprocess.CompletedProcess[str]:
    # wide: the test reads sentences the command prints, which a console of 80 columns would wrap
    return sh(sys.executable, "-m", "testbed.cli", *args, timeout_s=timeout_s, env={**os.environ, "COLUMNS": "250"})


def test_vagrant_lab_from_nothing(lab_env: Path) -> None:
    from testbed.lab import libvirt_host as lvh
    if lvh.open_connection(lvh.DEFAULT_URI) is not None:
        pytest.skip("a libvirtd already runs at qemu:///system: this test starts from nothing")
    if Path(REPO_ROOT / ".vagrant").exists() and any((REPO_ROOT / ".vagrant").rglob("id")):
        pytest.skip("a Vagrant lab of this directory exists (.vagrant/): `testbed lab vagrant down` first")
    images, pools = Path("/var/lib/libvirt/images"), Path("/etc/libvirt/storage")
    volumes_before = set(images.glob("testbed-VAGRANTSLASH-host_*")) if images.exists() else set()
    pool_before = (pools / "default.xml").exists()
    made = sh("make", "setup-vagrant", "vagrant-box")
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    if shutil.which("vagrant"):
        sh("vagrant", "box", "remove", "--force", "testbed/host", timeout_s=300)   # from nothing: no box
    t0 = time.monotonic()
    try:
        up = run_testbed("lab", "vagrant", "up")
        said = up.stdout + up.stderr
        print(said[-3000:])
        assert up.returncode == 0, said[-3000:]
        took = time.monotonic() - t0
        print(f"testbed lab vagrant up from nothing: {took:.0f} s")
        assert "box: added testbed/host" in said, said
        assert "libvirtd: none ran at qemu:///system; started one" in said, said
        assert "domain type: " in said and "accelerator probe" in said, said
        assert "make vagrant-lab-down" in said, said
        for vc in ("vc-a", "vc-b"):
            r = run_testbed("--lab", "vg", "vcenter", "show", vc)
            assert r.returncode == 0, r.stdout + r.stderr
            hosts = json.loads(r.stdout)["hosts"]
            assert len(hosts) == 2 and all(h["connection_state"] == "CONNECTED" for h in hosts), hosts
    finally:
        down = run_testbed("lab", "vagrant", "down", timeout_s=900)
        print(down.stdout + down.stderr)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "warning" not in down.stdout + down.stderr, down.stdout + down.stderr
    assert lvh.open_connection(lvh.DEFAULT_URI) is None, "the libvirtd it started still answers"
    assert not Path(os.environ["TESTBED_HOME"], "labs", "vg", "state.json").exists()
    assert not (set(images.glob("testbed-VAGRANTSLASH-host_*")) - volumes_before), "a box volume is left"
    assert (pools / "default.xml").exists() == pool_before, "the storage pool vagrant-libvirt defined is left"
    links = sh("ip", "-o", "link", "show").stdout
    assert "virbr" not in links and "tb-vg" not in links, links
