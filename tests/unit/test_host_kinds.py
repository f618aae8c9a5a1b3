"""What the lab build makes for each host kind, without root: every command it would run, where, and what it records.

``capture`` builds a two-site lab with netns and nested hosts against fakes of the machine (commands are
recorded, not run; no namespace, process or key is made), provisions its hosts and reads its status.
``host_kinds_wiring.json`` is what the build made before the host kinds became classes (``testbed.lab.kinds``):
the refactor changed none of it. Then each kind's wiring for a small lab, that every kind the topology names has
its classes, and that no code under testbed/ branches on a kind's name any more.
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


def small() -> Topology:
    """One site: a netns host, then a nested one; one port group."""
    return Topology(name="kt", sites=(SiteSpec(name="site-a", vcenter=VCenterSpec(name="vc-a"), hosts=(
        HostSpec(name="esx-a1"), HostSpec(name="esx-a2", kind="nested"))),))


def test_a_netns_host_is_a_namespace_wired_to_its_site_with_its_sshd_and_agent_here() -> None:
    from testbed.lab import kinds
    t = small()
    h = t.sites[0].hosts[0]
    k = kinds.of(h)
    assert isinstance(k, kinds.Netns)
    assert k.netns("kt", "esx-a1") == k.sshd_netns("kt", "esx-a1") == k.agent_netns("kt", "esx-a1") == "kt-esx-a1"
    assert k.root_links(t, 0, 1, h) == [] and k.root_bridges(t, 0, 1, h) == ([], [], [])
    assert k.site_links(t, 0, 1, h) == [
        "link add name vmk0 netns kt-esx-a1 mtu 1500 type veth peer name p1m netns kt-site-a mtu 1500",
        "link add name vmk1 netns kt-esx-a1 mtu 1500 type veth peer name p1v netns kt-site-a mtu 1500",
        "link add name up0 netns kt-esx-a1 mtu 1500 type veth peer name p1u0 netns kt-site-a mtu 1500"]


def test_a_nested_host_is_bridges_and_veths_in_the_root_namespace_and_runs_its_own_sshd_and_agent() -> None:
    from testbed.lab import kinds
    t = small()
    h = t.sites[0].hosts[1]
    k = kinds.of(h)
    assert isinstance(k, kinds.Nested)
    assert k.netns("kt", "esx-a2") is k.sshd_netns("kt", "esx-a2") is k.agent_netns("kt", "esx-a2") is None
    assert k.root_links(t, 0, 2, h) == ["kt_002m", "kt-002m", "kt_002v", "kt-002v", "kt_002u0", "kt-002u0"]
    assert k.root_bridges(t, 0, 2, h) == (
        ["link add name kt_002m mtu 1500 type bridge", "link add name kt_002v mtu 1500 type bridge",
         "link add name kt_002u0 mtu 1500 type bridge"],
        ["net.ipv6.conf.kt_002m.disable_ipv6=1", "net.ipv6.conf.kt-002m.disable_ipv6=1",
         "net.ipv6.conf.kt_002v.disable_ipv6=1", "net.ipv6.conf.kt-002v.disable_ipv6=1",
         "net.ipv6.conf.kt_002u0.disable_ipv6=1", "net.ipv6.conf.kt-002u0.disable_ipv6=1"],
        ["link set kt-002m master kt_002m", "link set kt-002m up", "link set kt_002m up",
         "link set kt-002v master kt_002v", "link set kt-002v up", "link set kt_002v up",
         "link set kt-002u0 master kt_002u0", "link set kt-002u0 up", "link set kt_002u0 up"])
    assert k.site_links(t, 0, 2, h) == [
        "link add name kt-002m mtu 1500 type veth peer name p2m netns kt-site-a mtu 1500",
        "link add name kt-002v mtu 1500 type veth peer name p2v netns kt-site-a mtu 1500",
        "link add name kt-002u0 mtu 1500 type veth peer name p2u0 netns kt-site-a mtu 1500"]
    assert [x.name for x in kinds.hosts(t, kinds.Nested)] == ["esx-a2"]


def test_every_kind_the_topology_names_has_its_wiring_and_its_runtime() -> None:
    """A kind added to ``HostSpec.kind`` needs a class in ``testbed.lab.kinds`` and a ``Host`` class in labctl's map."""
    from typing import get_args

    from testbed import labctl
    from testbed.lab import kinds
    names = set(get_args(HostSpec.model_fields["kind"].annotation))
    assert names == set(kinds.KINDS) == set(labctl.HOST_CLASSES)
    assert all(kinds.KINDS[n].name == n == labctl.HOST_CLASSES[n].kind for n in names)


ROOT = Path(__file__).resolve().parents[2]
# where a host kind's name may still be tested: the topology's own validation (a limit of nested hosts)
MAY_TEST_A_KIND = {("testbed/lab/topology.py", "_unique")}


def kind_tests(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line, enclosing function) of each comparison with a kind's name, and of each isinstance of a Host class."""
    import ast

    found: list[tuple[int, str]] = []

    def names_a_kind(node: ast.expr) -> bool:
        elts = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
        return any(isinstance(e, ast.Constant) and e.value in names for e in elts)

    def visit(node: ast.AST, func: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            func = node.name
        if isinstance(node, ast.Compare) and any(names_a_kind(e) for e in [node.left, *node.comparators]):
            found.append((node.lineno, func))
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2
                and any(getattr(n, "id", getattr(n, "attr", "")) in ("NetnsHost", "NestedHost")
                        for n in ast.walk(node.args[1]))):
            found.append((node.lineno, func))
        for child in ast.iter_child_nodes(node):
            visit(child, func)
    visit(ast.parse(path.read_text()), "")
    return found


def test_no_module_tests_a_host_kind_by_name() -> None:
    """The build and the runtime ask a host's kind class (``testbed.lab.kinds``, labctl's ``HOST_CLASSES``);
    no code branches on ``kind == "netns"`` or on ``isinstance(h, NestedHost)``."""
    from typing import get_args
    names = set(get_args(HostSpec.model_fields["kind"].annotation))
    found = [f"{rel}:{line} in {func or 'the module'}"
             for f in sorted((ROOT / "testbed").rglob("*.py"))
             for line, func in kind_tests(f, names)
             if ((rel := str(f.relative_to(ROOT))), func) not in MAY_TEST_A_KIND]
    assert not found, "code that tests a host kind by name (make it a method of the kind):\n" + "\n".join(found)


def test_the_check_sees_a_kind_test(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('def f(h, x):\n    if h.kind == "nested":\n        pass\n    return h.kind in ("netns",) or '
                   'isinstance(x, hosts.NetnsHost)\n')
    assert kind_tests(bad, {"netns", "nested"}) == [(2, "f"), (4, "f"), (4, "f")]
