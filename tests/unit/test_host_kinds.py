"""What the lab build makes for each host kind, without root: every command it would run, where, and what it records.

``capture`` builds a two-site lab with netns and nested hosts against fakes of the machine (commands are
recorded, not run; no namespace, process or key is made), provisions its hosts and reads its status.
``host_kinds_wiring.json`` is what the build made before the host kinds became classes (``testbed.lab.kinds``):
the refactor changed none of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from testbed.lab.topology import HostSpec, PortGroupSpec, SiteSpec, Topology, VCenterSpec

GOLDEN = Path(__file__).with_name("host_kinds_wiring.json")


def topology() -> Topology:
    """Site A: a netns host then a nested one; site B: a nested host then a netns one; two port groups."""
    return Topology(name="kt", port_groups=(PortGroupSpec(name="VM Network"), PortGroupSpec(name="DMZ")), sites=(
        SiteSpec(name="site-a", vcenter=VCenterSpec(name="vc-a"),
                 hosts=(HostSpec(name="esx-a1"), HostSpec(name="esx-a2", kind="nested"))),
        SiteSpec(name="site-b", vcenter=VCenterSpec(name="vc-b"),
                 hosts=(HostSpec(name="esx-b1", kind="nested"), HostSpec(name="esx-b2")))))


def capture(tmp: Path) -> dict[str, Any]:
    """Build ``topology()`` under ``tmp`` with the machine faked; then read ``lab status`` and the host classes."""
    from testbed import labctl
    from testbed.hosts import nested
    from testbed.lab import builder, libvirt_host, wanctl
    from testbed.lab.state import LabState, ProcessRecord, StateFile, proc_starttime
    from testbed.net import cmd, fabric, wan

    commands: dict[str, list[str]] = defaultdict(list)   # by namespace ("root": this machine's)
    lock = threading.Lock()
    spawned: list[list[Any]] = []

    def norm(s: str) -> str:
        return s.replace(str(tmp), "$TMP")

    def fake_run(argv: list[str], *, netns: str | None = None, input: str | None = None, check: bool = True,
                 timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        if argv[:2] == ["openssl", "passwd"]:
            return subprocess.CompletedProcess(argv, 0, "$6$salt$hash\n", "")
        where = netns or (argv[2] if argv[1:2] == ["-n"] else "root")
        with lock:
            commands[where] += [norm(" ".join(argv))] + [norm(line) for line in (input or "").splitlines()]
        return subprocess.CompletedProcess(argv, 0, "", "")

    def fake_keygen(path: Path, comment: str) -> None:
        path.write_text("private\n")
        path.with_suffix(".pub").write_text(f"ssh-ed25519 KEY-{comment} {comment}\n")

    def fake_spawn(state: LabState, sf: StateFile, role: str, netns: str, argv: list[str], log: Path) -> ProcessRecord:
        spawned.append([role, netns, [norm(a) for a in argv], norm(str(log))])
        rec = ProcessRecord(role=role, pid=0, starttime=0, netns=netns)
        state.processes.append(rec)
        sf.save(state)
        return rec

    t = topology()
    etc = tmp / "etc-netns"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESTBED_HOME", str(tmp / "home"))
        for module in (cmd, fabric, builder, wan):
            mp.setattr(module, "run", fake_run)
        mp.setattr(wan, "kernel_tcp_buffers", lambda: ([4096, 131072, 6291456], [4096, 16384, 4194304]))
        mp.setattr(wan, "choose_mechanism", lambda t: "netem")
        mp.setattr(wanctl, "start", lambda *a, **k: None)
        mp.setattr(builder, "_keygen", fake_keygen)
        mp.setattr(builder, "_spawn", fake_spawn)
        mp.setattr(builder, "start_observer", lambda *a, **k: None)
        mp.setattr(builder, "PRIVSEP_DIR", tmp / "run-sshd")
        mp.setattr(builder, "NETNS_ETC", etc)
        mp.setattr(libvirt_host, "domain_running", lambda state, name: name == "kt-esx-a2")

        paths = builder.LabPaths(t.name)
        paths.dir.mkdir(parents=True)
        sf = StateFile(paths.dir)
        state = LabState(name=t.name, topology=t)
        builder._build(t, paths, sf, state)
        labctl.provision_hosts(state)

        # esx-b2's sshd and agent run (this process stands in for both); esx-a1's are recorded but gone
        me = ProcessRecord(role="", pid=os.getpid(), starttime=proc_starttime(os.getpid()) or 0)
        state.processes += [me.model_copy(update={"role": "sshd esx-b2"}),
                            me.model_copy(update={"role": "hostd esx-b2"})]
        state.status = "up"
        sf.save(state)
        status = asyncio.run(labctl.status(t.name))
        return {
            "commands": dict(commands),
            "namespaces": state.namespaces,
            "root_links": state.root_links,
            "spawned": spawned,
            "system_paths": [norm(p) for p in state.system_paths],
            "netns_etc": sorted(str(p.relative_to(etc)) for p in etc.rglob("*")),
            "known_hosts": paths.known_hosts.read_text().splitlines(),
            "host_files": sorted(str(p.relative_to(paths.dir)) for p in (paths.dir / "hosts").rglob("*")),
            "status": [{k: v for k, v in h.items() if k in ("name", "kind", "state", "netns")}
                       for h in status["hosts"]],
            "host_classes": {n: type(h).__name__ for n, h in labctl.hosts_of(state).items()},
            "nested_hosts": [h.name for h in nested.nested_hosts(state)],
        }


def test_the_build_makes_what_it_made_before_the_kind_classes(tmp_path: Path) -> None:
    """Same namespaces, interfaces, names, commands (in order, per namespace), processes and records as the
    build before the host kinds were classes."""
    got = capture(tmp_path)
    want = json.loads(GOLDEN.read_text())
    for key in want:
        assert got[key] == want[key], key
    assert set(got) == set(want)
