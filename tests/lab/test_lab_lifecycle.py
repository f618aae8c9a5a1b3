"""lab up / status / down: fast, complete, and leaving nothing behind, even after a crash."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import labctl
from testbed.errors import Conflict
from testbed.lab import builder
from testbed.lab.topology import default_topology
from testbed.net import fabric
from testbed.paths import lab_dir
from testbed.vcenter import deploy

from ..conftest import unique_lab_name

pytestmark = pytest.mark.lab


def snapshot() -> dict[str, object]:
    """What exists on the machine that a lab could leave behind."""
    netns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    etc = set(os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else set()
    return {"netns": netns, "links": {line.split(":")[1].strip() for line in links.splitlines()},
            "etc_netns": etc}


def assert_nothing_left(name: str, before: dict[str, object], pids: list[int]) -> None:
    after = snapshot()
    assert after["netns"] == before["netns"], f"namespaces left: {after['netns'] - before['netns']}"  # type: ignore[operator]
    assert after["links"] == before["links"]
    assert after["etc_netns"] == before["etc_netns"], "name files left in /etc/netns"
    assert not lab_dir(name).exists(), f"{lab_dir(name)} left behind"
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", f"process {pid} left"


def test_up_status_down_leaves_nothing(lab_env: Path) -> None:
    name = unique_lab_name()
    before = snapshot()
    t0 = time.monotonic()
    times = asyncio.run(deploy.up(default_topology(name)))
    up_s = time.monotonic() - t0
    try:
        vcs = deploy.status(name)
        assert [(v["name"], v["running"]) for v in vcs] == [("vc-a", True), ("vc-b", True)]
        st = asyncio.run(labctl.status(name, check_agents=True))
        pids = [p["pid"] for p in st["processes"]]
        assert [s["name"] for s in st["sites"]] == ["site-a", "site-b"]
        assert [v["sso_domain"] for v in st["vcenters"]] == ["vsphere-a.local", "vsphere-b.local"]
        assert [(h["name"], h["site"], h["state"]) for h in st["hosts"]] == [
            ("esx-a1", "site-a", "connected"), ("esx-a2", "site-a", "connected"),
            ("esx-b1", "site-b", "connected"), ("esx-b2", "site-b", "connected")]
        assert all(h["mgmt_address"].startswith("198.18.") and h["vmotion_address"].startswith("198.18.")
                   for h in st["hosts"])
        # the CLI prints the same thing as JSON
        out = subprocess.run([sys.executable, "-m", "testbed.cli", "--lab", name, "lab", "status", "--json"],
                             capture_output=True, text=True, check=True).stdout
        assert [h["name"] for h in json.loads(out)["hosts"]] == [h["name"] for h in st["hosts"]]
    finally:
        forced, down_s = labctl.down(name)
    print(f"\nlab up {up_s:.2f} s ({times}), lab down {down_s:.2f} s")
    assert forced == []
    assert_nothing_left(name, before, pids)
    # Targets: 15 s up (with the two vCenters and their hosts added), 5 s down on this machine;
    # asserted with room for a noisy CI neighbour.
    assert up_s < 40 and down_s < 10


def test_management_and_vmotion_networks_route_across_sites(lab: str) -> None:
    """Every host reaches every other host's management and vMotion address (TCP to sshd)."""
    st = asyncio.run(labctl.status(lab))
    src = fabric.ns_name(lab, "esx-a1")
    for h in st["hosts"][1:]:
        for addr in (h["mgmt_address"].split("/")[0],):
            r = subprocess.run(["ip", "netns", "exec", src, sys.executable, "-c",
                                f"import socket; socket.create_connection(('{addr}', 22), 3).close()"],
                               capture_output=True, text=True)
            assert r.returncode == 0, f"esx-a1 cannot reach {h['name']} at {addr}: {r.stderr}"
    b1 = next(h for h in st["hosts"] if h["name"] == "esx-b1")["vmotion_address"].split("/")[0]
    r = subprocess.run(["ip", "netns", "exec", src, "ping", "-c", "1", "-W", "2", b1], capture_output=True, text=True)
    assert r.returncode == 0, f"vMotion network esx-a1 -> esx-b1 ({b1}): {r.stdout}{r.stderr}"


def test_second_up_of_same_lab_is_refused(lab: str) -> None:
    with pytest.raises(Conflict, match="already up"):
        asyncio.run(labctl.up(default_topology(lab)))
    assert asyncio.run(labctl.status(lab))["status"] == "up"


def test_failure_halfway_removes_what_was_made(lab_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique_lab_name()
    before = snapshot()

    def boom(*a: object, **kw: object) -> None:
        raise RuntimeError("simulated failure while wiring the WAN")

    monkeypatch.setattr(fabric, "configure_wan", boom)
    with pytest.raises(Exception, match="simulated failure"):
        asyncio.run(labctl.up(default_topology(name)))
    assert_nothing_left(name, before, [])


def test_killed_lab_up_is_cleaned_by_lab_down(lab_env: Path) -> None:
    """``lab up`` SIGKILLed once it has started processes: ``lab down`` still removes everything."""
    name = unique_lab_name()
    before = snapshot()
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "--lab", name, "lab", "up"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    state_file = lab_dir(name) / "state.json"
    deadline = time.monotonic() + 30
    pids: list[int] = []
    while time.monotonic() < deadline:
        try:
            st = builder.LabState.model_validate_json(state_file.read_text())
            if st.processes:
                pids = [p.pid for p in st.processes]
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pids, "lab up never recorded a process"
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "--lab", name, "lab", "down"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_nothing_left(name, before, pids)
