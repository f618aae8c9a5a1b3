"""A libvirtd per namespace host: the libvirt host mode of the embedded lab.

The baseline the engine is measured against (``testbed bench``) is libvirt's own live
migration, so each host that needs it runs its own libvirtd, the way every real
hypervisor host runs one. It runs in the host's network namespace, and in its own mount
and UTS namespaces: ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/cache/libvirt`` and ``/var/log/libvirt`` are bind-mounted from the host's directory
(``<lab>/hosts/<host>/libvirt/...``; ``/run`` itself is a private tmpfs), the hostname is the
host's, ``/etc/resolv.conf`` points at the host's own loopback, and the host UUID is derived from the lab and host
names. So two libvirtds on one machine never share a socket, a domain, a log or an
identity, and nothing they look up leaves the lab.

The daemon listens for its peers on the management address, TCP without authentication
(lab only: the namespaces are reachable from nothing else). Its QEMUs are the same binary
as the host agent's, with the host's own datastore directory for disks. It is a lab
process: recorded in the lab's state when started, stopped by ``lab down`` with its
QEMUs (everything in the host's namespace).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

from testbed.errors import LabError
from testbed.lab import builder
from testbed.lab import topology as topo
from testbed.lab.state import StateFile, record_alive
from testbed.net import fabric
from testbed.paths import lab_dir

LIBVIRTD = "/usr/sbin/libvirtd"
PORT = 16509
MOUNTS = ("etc/libvirt", "run/libvirt", "var/lib/libvirt", "var/cache/libvirt", "var/log/libvirt")


def root(lab: str, host: str) -> Path:
    return builder.LabPaths(lab).host_dir(host) / "libvirt"


def socket_path(lab: str, host: str) -> Path:
    return root(lab, host) / "run" / "libvirt" / "libvirt-sock"


def local_uri(lab: str, host: str) -> str:
    """How this machine's root namespace reaches the host's libvirtd (its UNIX socket)."""
    return f"qemu:///system?socket={socket_path(lab, host)}"


def peer_uri(t: topo.Topology, host: str) -> str:
    """How another host's libvirtd reaches this one (peer-to-peer migration), over the management network."""
    si, _, hi, _ = t.host(host)
    return f"qemu+tcp://{topo.host_addresses(si, hi).mgmt.split('/')[0]}/system"


def role(host: str) -> str:
    return f"libvirtd {host}"


def _configure(t: topo.Topology, host: str, debug: bool) -> Path:
    si, _, hi, _ = t.host(host)
    mgmt = topo.host_addresses(si, hi).mgmt.split("/")[0]
    r = root(t.name, host)
    for m in MOUNTS:
        (r / m).mkdir(parents=True, exist_ok=True)
    etc = r / "etc" / "libvirt"
    # libvirtd logs its QMP traffic with timestamps at debug level (where a migration's time goes)
    filters = 'log_filters = "1:qemu.qemu_monitor 1:qemu.qemu_migration 3:*"\n' if debug else ""
    (etc / "libvirtd.conf").write_text(
        "listen_tls = 0\nlisten_tcp = 1\n"
        f'listen_addr = "{mgmt}"\ntcp_port = "{PORT}"\nauth_tcp = "none"\n'
        'unix_sock_group = "root"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n'
        f'host_uuid = "{uuid.uuid5(uuid.NAMESPACE_DNS, topo.fqdn(t, host))}"\n'
        f'{filters}log_outputs = "{1 if debug else 3}:file:/var/log/libvirt/libvirtd.log"\n')
    (etc / "qemu.conf").write_text(
        'stdio_handler = "file"\nsecurity_driver = "none"\nuser = "root"\ngroup = "root"\n'
        "dynamic_ownership = 0\nremember_owner = 0\nnamespaces = [ ]\n")
    resolv = r / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    return resolv


def start(lab: str, host: str, *, debug: bool = False, timeout_s: float = 30.0) -> int:
    """Start ``host``'s libvirtd (or find it running); returns its PID once its socket answers."""
    state = builder.load_state(lab)
    t = state.topology
    t.host(host)   # NotFound with the list of hosts
    for p in state.processes:
        if p.role == role(host) and record_alive(p):
            return p.pid
    if not Path(LIBVIRTD).exists():
        raise LabError(f"libvirtd is not installed ({LIBVIRTD}); needed on host {host} for the libvirt baseline",
                       hint="run `make setup` (it installs libvirt from bookworm-backports)")
    resolv = _configure(t, host, debug)
    r = root(lab, host)
    mounts = " && ".join(f'mount --bind "{r / m}" /{m}' for m in MOUNTS)
    # /run gets a private tmpfs: /run/libvirt need not exist on this machine (no systemd made it)
    script = (f"mount -t tmpfs -o mode=0755 tb-run /run && mkdir /run/libvirt && {mounts} && "
              f'mount --bind "{resolv}" /etc/resolv.conf && hostname "{host}" && '
              f'exec {LIBVIRTD} --listen --pid-file "{r / "libvirtd.pid"}"')
    sock = socket_path(lab, host)
    sock.unlink(missing_ok=True)
    log = r / "libvirtd.out"
    netns = fabric.ns_name(lab, host)
    with open(log, "ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "--uts", "sh", "-c", script],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    builder.record_process(lab, role(host), proc.pid, netns)
    deadline = time.monotonic() + timeout_s
    while not sock.exists():
        if proc.poll() is not None:
            raise LabError(f"libvirtd on host {host} exited at start (status {proc.returncode})",
                           hint=f"see {log} and {r / 'var' / 'log' / 'libvirt' / 'libvirtd.log'}")
        if time.monotonic() > deadline:
            raise LabError(f"libvirtd on host {host} did not open its socket {sock} within {timeout_s:.0f} s",
                           hint=f"see {log}; `testbed lab down` stops it")
        time.sleep(0.05)
    return proc.pid


def running(lab: str, host: str) -> bool:
    sf = StateFile(lab_dir(lab))
    return any(p.role == role(host) and record_alive(p) for p in sf.load().processes)
