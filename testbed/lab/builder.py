"""Make a topology real as network namespaces on this machine, and take it down.

``build`` creates the namespaces and wiring (``testbed.net.fabric``), an sshd
per host (its own host key; the lab's key authorized) and the heartbeat
observer; every namespace, process and system path is recorded in the lab's
state before or as it is created. ``teardown`` removes exactly what the state
records, whether ``build`` finished or crashed halfway.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from testbed.errors import Conflict, LabError, NotFound, TestbedError
from testbed.lab import topology as topo
from testbed.lab.state import LabState, ProcessRecord, StateFile, proc_starttime, record_alive
from testbed.net import fabric
from testbed.net.cmd import netns_exists, netns_pids, run
from testbed.paths import lab_dir

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


class LabPaths:
    def __init__(self, name: str) -> None:
        self.dir = lab_dir(name)

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def observer_socket(self) -> Path:
        return self.dir / "observer.sock"

    def host_dir(self, host: str) -> Path:
        return self.dir / "hosts" / host


def namespaces_of(t: topo.Topology) -> list[str]:
    names = [fabric.ns_name(t.name, s.name) for s in t.sites]
    names += [fabric.ns_name(t.name, s.vcenter.name) for s in t.sites]
    names += [fabric.ns_name(t.name, h.name) for *_, h in t.hosts()]
    names.append(fabric.ns_name(t.name, "obs"))
    if len(t.sites) > 1:
        names.append(fabric.ns_name(t.name, "wan"))
    return names


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise LabError("the embedded lab needs root (network namespaces, bridges, taps)",
                       hint="run as root")
    missing = [p for p in ("ip", "bridge", "tc", "ssh-keygen", "qemu-img", "qemu-system-x86_64")
               if shutil.which(p) is None]
    if not Path(SSHD).exists():
        missing.append(SSHD)
    if missing:
        raise LabError("missing on this machine: " + ", ".join(missing),
                       hint="run `make setup` (installs QEMU from bookworm-backports, openssh-server, iproute2)")


def _spawn(state: LabState, sf: StateFile, role: str, netns: str, argv: list[str], log: Path) -> ProcessRecord:
    with open(log, "ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    start = proc_starttime(proc.pid)
    rec = ProcessRecord(role=role, pid=proc.pid, starttime=start or 0, netns=netns)
    state.processes.append(rec)
    sf.save(state)
    return rec


def _sshd_config(t: topo.Topology, paths: LabPaths, host: str, address: str) -> Path:
    hd = paths.host_dir(host)
    cfg = hd / "sshd_config"
    cfg.write_text("\n".join([
        f"ListenAddress {address}", "Port 22",
        f"HostKey {hd / 'ssh_host_ed25519_key'}",
        f"PidFile {hd / 'sshd.pid'}",
        f"AuthorizedKeysFile {paths.authorized_keys}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        "PrintMotd no", "UseDNS no", "MaxSessions 64", "MaxStartups 64:30:128",
        "ClientAliveInterval 15", "Subsystem sftp internal-sftp", "",
    ]))
    return cfg


def _keygen(path: Path, comment: str) -> None:
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def build(t: topo.Topology) -> LabState:
    """Build lab ``t``; on any failure, remove what was made and re-raise."""
    check_prerequisites()
    paths = LabPaths(t.name)
    sf = StateFile(paths.dir)
    with sf.locked():
        if sf.exists():
            raise Conflict(f"lab {t.name!r} is already up (or was left half built)",
                           hint=f"`testbed --lab {t.name} lab down` first")
        taken = [n for n in namespaces_of(t) if netns_exists(n)]
        if taken:
            raise Conflict("network namespaces already exist that this lab would create: " + ", ".join(taken),
                           hint="another lab with the same name prefix is up; take it down or choose "
                                "another lab name")
        state = LabState(name=t.name, topology=t, created_s=time.time(),
                         link_bandwidth_bps=t.link.bandwidth_bps)
        sf.save(state)
    try:
        _build(t, paths, sf, state)
    except BaseException as err:
        try:
            teardown(t.name)
        except Exception as cleanup_err:  # report both; the build error comes first
            print(f"lab up: cleanup after the failure also failed: {cleanup_err}", file=sys.stderr)
        if isinstance(err, TestbedError):
            raise
        if isinstance(err, Exception):
            raise LabError(f"building lab {t.name} failed: {err}",
                           hint="nothing was left behind; fix the cause above and retry") from err
        raise
    return state


def _build(t: topo.Topology, paths: LabPaths, sf: StateFile, state: LabState) -> None:
    if not PRIVSEP_DIR.exists():
        PRIVSEP_DIR.mkdir(mode=0o755)
        state.system_paths.append(str(PRIVSEP_DIR))
    namespaces = namespaces_of(t)
    state.namespaces = namespaces
    sf.save(state)
    run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in namespaces))

    with ThreadPoolExecutor(max_workers=8) as pool:
        # keys while the network is wired
        _keygen(paths.key, f"testbed-lab-{t.name}")
        paths.authorized_keys.write_text(paths.key.with_suffix(".pub").read_text())
        keyjobs = []
        for _, _, _, h in t.hosts():
            paths.host_dir(h.name).mkdir(parents=True)
            keyjobs.append(pool.submit(_keygen, paths.host_dir(h.name) / "ssh_host_ed25519_key",
                                       f"root@{h.name}"))
        multi = len(t.sites) > 1
        wan = fabric.ns_name(t.name, "wan") if multi else None
        run(["ip", "-batch", "-"], input="\n".join(fabric.link_commands(t, wan)) + "\n")
        list(pool.map(lambda si: fabric.configure_site(t, si, multi), range(len(t.sites))))
        if wan:
            fabric.configure_wan(t, wan)
        if t.link.bandwidth_bps:
            fabric.shape_link(t, t.link.bandwidth_bps)
        for j in keyjobs:
            j.result()

    known = []
    for si, _, hi, h in t.hosts():
        addr = topo.host_addresses(si, hi).mgmt.split("/")[0]
        pub = (paths.host_dir(h.name) / "ssh_host_ed25519_key.pub").read_text().split()
        known.append(f"{addr} {pub[0]} {pub[1]}")
        cfg = _sshd_config(t, paths, h.name, addr)
        _spawn(state, sf, f"sshd {h.name}", fabric.ns_name(t.name, h.name),
               [SSHD, "-D", "-f", str(cfg), "-E", str(paths.host_dir(h.name) / "sshd.log")],
               paths.host_dir(h.name) / "sshd.out")
    paths.known_hosts.write_text("\n".join(known) + "\n")
    _spawn(state, sf, "observer", fabric.ns_name(t.name, "obs"),
           [sys.executable, "-m", "testbed.lab.observer", "--bind", str(topo.OBSERVER_IP),
            "--port", str(topo.OBSERVER_PORT), "--control", str(paths.observer_socket)],
           paths.dir / "observer.log")
    deadline = time.monotonic() + 10
    while not paths.observer_socket.exists():
        if time.monotonic() > deadline:
            raise LabError(f"the heartbeat observer did not start; see {paths.dir / 'observer.log'}")
        if not all(record_alive(p) for p in state.processes):
            dead = [p.role for p in state.processes if not record_alive(p)]
            raise LabError(f"lab processes exited right after start: {', '.join(dead)}",
                           hint=f"see the logs under {paths.dir}")
        time.sleep(0.02)


def mark_up(name: str) -> LabState:
    sf = StateFile(lab_dir(name))
    with sf.locked():
        state = sf.load()
        state.status = "up"
        state.up_s = time.time()
        sf.save(state)
    return state


def load_state(name: str) -> LabState:
    sf = StateFile(lab_dir(name))
    if not sf.exists():
        raise NotFound(f"lab {name!r} is not up", hint="start it with `testbed lab up`")
    return sf.load()


def record_process(name: str, role: str, pid: int, netns: str | None) -> None:
    sf = StateFile(lab_dir(name))
    with sf.locked():
        state = sf.load()
        state.processes.append(ProcessRecord(role=role, pid=pid, starttime=proc_starttime(pid) or 0,
                                             netns=netns))
        sf.save(state)


def teardown(name: str, *, grace_s: float = 3.0) -> list[str]:
    """Remove everything lab ``name`` recorded. Returns what it had to force."""
    paths = LabPaths(name)
    sf = StateFile(paths.dir)
    if not sf.exists():
        if paths.dir.exists():
            shutil.rmtree(paths.dir)
            return []
        raise NotFound(f"lab {name!r} is not up; there is nothing to take down")
    state = sf.load()
    state.status = "tearing-down"
    sf.save(state)
    forced: list[str] = []

    def victims() -> set[int]:
        pids = {p.pid for p in state.processes if record_alive(p)}
        for ns in state.namespaces:
            pids.update(netns_pids(ns))
        pids.discard(os.getpid())
        return pids

    for pid in victims():
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := victims()) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in left:
        forced.append(f"pid {pid} ({_comm(pid)}) killed with SIGKILL after {grace_s:.0f} s")
        _kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while victims() and time.monotonic() < deadline:
        time.sleep(0.02)
    existing = [n for n in state.namespaces if netns_exists(n)]
    if existing:
        run(["ip", "-batch", "-"], input="".join(f"netns del {n}\n" for n in existing))
    other_labs = [p for p in paths.dir.parent.iterdir() if p != paths.dir and (p / "state.json").exists()] \
        if paths.dir.parent.exists() else []
    for sp in state.system_paths:
        if Path(sp) == PRIVSEP_DIR and other_labs:
            continue   # another lab's sshd still needs it
        try:
            Path(sp).rmdir()
        except FileNotFoundError:
            pass
        except OSError as err:
            forced.append(f"left {sp} in place: {err.strerror}")
    shutil.rmtree(paths.dir)
    return forced


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
