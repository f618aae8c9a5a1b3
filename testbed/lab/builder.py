"""Make a topology real as network namespaces on this machine, and take it down.

``build`` creates the namespaces and wiring (``testbed.net.fabric``, each host's
part by its kind: ``testbed.lab.kinds``), an sshd per host that needs one here
(its own host key; the lab's key authorized) and the heartbeat observer; every
namespace, process and system path is recorded in the lab's state before or as
it is created. ``teardown`` removes exactly what the state records, whether
``build`` finished or crashed halfway.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from testbed.errors import Conflict, LabError, NotFound, TestbedError
from testbed.lab import kinds, libvirt_host, wanctl
from testbed.lab import topology as topo
from testbed.lab.state import LabState, ProcessRecord, StateFile, proc_starttime, record_alive
from testbed.net import fabric
from testbed.net import wan as net_wan
from testbed.net.cmd import netns_exists, netns_pids, run
from testbed.paths import lab_dir

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
NETNS_ETC = Path("/etc/netns")


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
    names += host_namespaces(t)
    names.append(fabric.ns_name(t.name, "obs"))
    if len(t.sites) > 1:
        names.append(fabric.ns_name(t.name, "wan"))
    return names


def host_namespaces(t: topo.Topology) -> list[str]:
    """The hosts' own namespaces (a host of a kind without one has none)."""
    return [ns for *_, h in t.hosts() if (ns := kinds.of(h).netns(t.name, h.name)) is not None]


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
    """The host's sshd: root logs in with the host's own password or an authorized key.

    ``SetEnv`` tells sessions where this host keeps its agent, its agent's
    configuration and root's authorized keys (on a real host: fixed paths).
    """
    hd = paths.host_dir(host)
    cfg = hd / "sshd_config"
    hostd = Path(sys.executable).with_name("testbed-hostd")
    cfg.write_text("\n".join([
        f"ListenAddress {address}", "Port 22",
        f"HostKey {hd / 'ssh_host_ed25519_key'}",
        f"PidFile {hd / 'sshd.pid'}",
        f"AuthorizedKeysFile {paths.authorized_keys} {hd / 'authorized_keys'}",
        f"SetEnv TESTBED_HOSTD={hostd} TESTBED_HOSTD_CONFIG={hd / 'hostd.json'} "
        f"TESTBED_AUTHORIZED_KEYS={hd / 'authorized_keys'}",
        "PermitRootLogin yes", "PasswordAuthentication yes",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        "PrintMotd no", "UseDNS no", "MaxSessions 64", "MaxStartups 64:30:128",
        "ClientAliveInterval 15", "Subsystem sftp internal-sftp", "",
    ]))
    return cfg


def _root_password(paths: LabPaths, h: topo.HostSpec) -> Path:
    """The host's own root password (the topology's, or a random one): kept 0600 for the lab's
    operator, and as the only line of a shadow file that the host's sshd sees as /etc/shadow."""
    hd = paths.host_dir(h.name)
    password = h.root_password or secrets.token_urlsafe(12)
    (hd / "root-password").touch(mode=0o600)
    (hd / "root-password").write_text(password + "\n")
    hashed = run(["openssl", "passwd", "-6", "-stdin"], input=password).stdout.strip()
    shadow = hd / "shadow"
    shadow.touch(mode=0o600)
    shadow.write_text(f"root:{hashed}:19000:0:99999:7:::\n")
    return shadow


def hosts_file(t: topo.Topology) -> str:
    """Names of the lab's nodes, for /etc/hosts inside its namespaces: `esx-a1.<lab>.test esx-a1`."""
    lines = ["127.0.0.1 localhost"]
    for si, site in enumerate(t.sites):
        lines.append(f"{topo.vcenter_address(si).split('/')[0]} {topo.fqdn(t, site.vcenter.name)} "
                     f"{site.vcenter.name}")
    for si, _, hi, h in t.hosts():
        lines.append(f"{topo.host_addresses(si, hi).mgmt.split('/')[0]} {topo.fqdn(t, h.name)} {h.name}")
    return "\n".join(lines) + "\n"


def name_service(t: topo.Topology, state: LabState, sf: StateFile) -> None:
    """/etc/netns/<ns>/hosts for the vCenter and host namespaces (`ip netns exec` mounts it on /etc/hosts)."""
    text = hosts_file(t)
    if not NETNS_ETC.exists():
        NETNS_ETC.mkdir(mode=0o755)
        state.system_paths.append(str(NETNS_ETC))
    for ns in [fabric.ns_name(t.name, s.vcenter.name) for s in t.sites] + host_namespaces(t):
        d = NETNS_ETC / ns
        d.mkdir(mode=0o755)
        state.system_paths.insert(0, str(d))
        (d / "hosts").write_text(text)
        state.system_paths.insert(0, str(d / "hosts"))
    sf.save(state)


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
    name_service(t, state, sf)
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
        state.root_links = fabric.root_links(t, kinds.of)   # recorded before they exist: teardown skips missing
        sf.save(state)
        run(["ip", "-batch", "-"], input="\n".join(fabric.link_commands(t, wan, kinds.of)) + "\n")
        _root_bridges(t)
        list(pool.map(lambda si: fabric.configure_site(t, si, multi, kinds.of), range(len(t.sites))))
        if wan:
            state.link_mechanism = net_wan.choose_mechanism(t)
            fabric.configure_wan(t, wan)
        for j in keyjobs:
            j.result()
    if wan:   # delay, jitter, loss, bandwidth: the delay line is a lab process (see lab.wanctl)
        wanctl.start(t, state, paths.dir, lambda: sf.save(state))
    wanctl.tune_hosts(state)
    sf.save(state)

    known = []
    for si, _, hi, h in t.hosts():
        addr = topo.host_addresses(si, hi).mgmt.split("/")[0]
        pub = (paths.host_dir(h.name) / "ssh_host_ed25519_key.pub").read_text().split()
        known.append(f"{addr} {pub[0]} {pub[1]}")
        shadow = _root_password(paths, h)
        sshd_ns = kinds.of(h).sshd_netns(t.name, h.name)
        if sshd_ns is None:
            continue   # the host runs its own sshd (an L1 VM: testbed.hosts.nested)
        cfg = _sshd_config(t, paths, h.name, addr)
        # `ip netns exec` gives sshd its own mount namespace (a slave of ours): the bind mounts of
        # the host's shadow file and of its root's (empty) ~/.bashrc stay inside it. Bash reads
        # ~/.bashrc for every SSH command; this machine's is not the host's (with pyenv in it: 0.45 s each).
        bashrc = paths.host_dir(h.name) / "root.bashrc"
        bashrc.touch()
        _spawn(state, sf, f"sshd {h.name}", sshd_ns,
               ["sh", "-c", 'mount --bind "$0" /etc/shadow && { [ ! -f /root/.bashrc ] || '
                'mount --bind "$1" /root/.bashrc; } && shift && exec "$@"',
                str(shadow), str(bashrc), SSHD, "-D", "-f", str(cfg), "-E", str(paths.host_dir(h.name) / "sshd.log")],
               paths.host_dir(h.name) / "sshd.out")
    paths.known_hosts.write_text("\n".join(known) + "\n")
    start_observer(t, state, sf, paths)


def _root_bridges(t: topo.Topology) -> None:
    """The root-namespace bridges the hosts' kinds need (a nested host's NICs): IPv6 off before they come up."""
    b = fabric.root_bridges(t, kinds.of)
    if not b.sysctls:
        return
    run(["ip", "-batch", "-"], input="\n".join(b.make) + "\n")
    run(["sysctl", "-q", "-w", *b.sysctls])
    run(["ip", "-batch", "-"], input="\n".join(b.up) + "\n")


def start_observer(t: topo.Topology, state: LabState, sf: StateFile, paths: LabPaths) -> None:
    """The heartbeat observer in the lab's ``obs`` namespace (recorded); returns once its control socket is up."""
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
    forced: list[str] = libvirt_host.release(state)   # the L1 VMs first, while libvirtd still runs
    sf.save(state)

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
    forced += libvirt_host.cleanup_after(state)
    other_labs = [p for p in paths.dir.parent.iterdir() if p != paths.dir and (p / "state.json").exists()] \
        if paths.dir.parent.exists() else []
    for sp in state.system_paths:   # files first, then their directories (recorded in that order)
        if Path(sp) in (PRIVSEP_DIR, NETNS_ETC) and other_labs:
            continue   # another lab still needs it
        if Path(sp) == PRIVSEP_DIR and _sshd_running():
            continue   # an sshd (another lab's, under another TESTBED_HOME, or the machine's) needs it
        try:
            if Path(sp).is_dir():
                Path(sp).rmdir()
            else:
                Path(sp).unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            forced.append(f"left {sp} in place: {err.strerror}")
    _remove_dir(paths.dir, {paths.dir / k for k in state.kept_paths})
    return forced


def _remove_dir(d: Path, keep: set[Path]) -> None:
    """Remove ``d`` and everything in it but the paths in ``keep`` (and the directories that hold them)."""
    if not keep:
        shutil.rmtree(d)
        return
    for p in d.iterdir():
        if p in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            if any(k.is_relative_to(p) for k in keep):
                _remove_dir(p, keep)
            else:
                shutil.rmtree(p)
        else:
            p.unlink()


def _sshd_running() -> bool:
    """Whether any sshd process runs on this machine (they all need /run/sshd at each connection)."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.readlink(p / "exe") == SSHD:
                    return True
            except OSError:
                continue
    return False


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
