"""L1 host VMs on this machine's libvirtd, through libvirt-python: the hardware of the nested host kind.

``ensure_libvirtd`` reaches the libvirtd at ``$TESTBED_LIBVIRT_URI`` (default
qemu:///system); where none runs it starts one and records it in the lab's state
(``release`` stops it only if this lab started it and no other domain runs on it).
``start_domain`` starts a transient domain (gone from libvirt once destroyed) and
records its name first, so a crash halfway still lets ``release`` destroy it.
Each L1 NIC is a tap on the root-namespace bridge ``testbed.net.fabric`` names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from testbed.errors import LabError
from testbed.lab.state import LabState, ProcessRecord, proc_starttime, record_alive
from testbed.net.cmd import run

DEFAULT_URI = "qemu:///system"
LIBVIRTD = "/usr/sbin/libvirtd"
RUN_DIR = Path("/run/libvirt")
ROLE = "libvirtd"
# Our own libvirtd reads this qemu.conf (bind-mounted in its private mount namespace): QEMU's output to
# files (no virtlogd to start and leave behind), no security driver, QEMU as root.
QEMU_CONF = 'stdio_handler = "file"\nsecurity_driver = "none"\nuser = "root"\ngroup = "root"\n' \
            'dynamic_ownership = 0\n'


def uri() -> str:
    return os.environ.get("TESTBED_LIBVIRT_URI", DEFAULT_URI)


def _libvirt() -> Any:
    import libvirt  # libvirt-python; only the nested host kind needs it
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)   # errors come as exceptions, not on stderr
    return libvirt


def open_connection(u: str) -> Any:
    """A libvirt connection, or None if no libvirtd answers at ``u``."""
    lv = _libvirt()
    try:
        return lv.open(u)
    except lv.libvirtError:
        return None


def ensure_libvirtd(state: LabState, lab_dir: Path, save: Callable[[], None], wait_s: float = 30.0) -> str:
    """The libvirt URI to use; starts (and records) a libvirtd if none runs at the default URI."""
    u = uri()
    conn = open_connection(u)
    if conn is not None:
        conn.close()
        state.libvirt_uri = u
        save()
        return u
    if u != DEFAULT_URI:
        raise LabError(f"no libvirtd answers at {u} ($TESTBED_LIBVIRT_URI); the nested hosts need one",
                       hint=f"start that libvirtd, or unset TESTBED_LIBVIRT_URI so the testbed uses {DEFAULT_URI} "
                            "(and starts a libvirtd there if none runs)")
    if not Path(LIBVIRTD).exists():
        raise LabError(f"no libvirtd runs at {u} and {LIBVIRTD} is not installed",
                       hint="run `make setup` (installs libvirt-daemon and libvirt-daemon-driver-qemu "
                            "from bookworm-backports)")
    if not RUN_DIR.exists():
        state.libvirt_run_dir_created = True
    rec, proc, log = spawn_libvirtd(lab_dir)
    state.processes.append(rec)
    state.libvirtd_started = True
    state.libvirt_uri = u
    save()
    conn = wait_libvirtd(u, proc, log, wait_s)
    conn.close()
    return u


def spawn_libvirtd(run_dir: Path) -> tuple[ProcessRecord, subprocess.Popen[bytes], Path]:
    """Start a libvirtd at the default URI with this project's qemu.conf (QEMU's output to files, no security
    driver, QEMU as root), which works without systemd, virtlogd or virtlockd. Its configuration, PID file and
    log go to ``run_dir``. The caller records the returned process and waits for it (``wait_libvirtd``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    conf = run_dir / "libvirt-qemu.conf"
    conf.write_text(QEMU_CONF)
    log = run_dir / "libvirtd.log"
    with open(log, "ab") as out:
        # A private mount namespace for the bind mount of qemu.conf only; /run stays shared, so the
        # daemon's sockets are where every client looks.
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c",
             'mount --bind "$0" /etc/libvirt/qemu.conf && exec "$@"', str(conf),
             LIBVIRTD, "--pid-file", str(run_dir / "libvirtd.pid")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    return ProcessRecord(role=ROLE, pid=proc.pid, starttime=proc_starttime(proc.pid) or 0), proc, log


def wait_libvirtd(u: str, proc: subprocess.Popen[bytes], log: Path, wait_s: float) -> Any:
    """A connection to the libvirtd just started, once it answers."""
    deadline = time.monotonic() + wait_s
    while (conn := open_connection(u)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise LabError(f"libvirtd did not come up at {u} within {wait_s:.0f} s "
                           f"({'exited ' + str(proc.returncode) if proc.poll() is not None else 'still starting'}): "
                           + " | ".join(tail),
                           hint=f"see {log}; is another libvirtd half-running (stale {RUN_DIR}/libvirt-sock)?")
        time.sleep(0.1)
    return conn


@dataclass(frozen=True)
class L1Nic:
    mac: str
    bridge: str


@dataclass(frozen=True)
class L1Domain:
    name: str
    memory_mib: int
    vcpus: int
    kvm: bool
    kernel: Path
    initrd: Path
    cmdline: str
    disk: Path
    nics: tuple[L1Nic, ...]
    console_log: Path
    identity_file: Path           # fw_cfg opt/testbed/identity

    def xml(self) -> str:
        nics = "".join(
            f"<interface type='bridge'><source bridge={quoteattr(n.bridge)}/><mac address={quoteattr(n.mac)}/>"
            "<model type='virtio'/></interface>" for n in self.nics)
        # TCG: the "max" CPU (every feature QEMU emulates) so QEMU inside runs well; KVM: the host's CPU
        # with virtualization passed through (nested KVM).
        cpu = "<cpu mode='host-passthrough'/>" if self.kvm else "<cpu mode='maximum' check='none'/>"
        return f"""<domain type='{'kvm' if self.kvm else 'qemu'}'>
  <name>{escape(self.name)}</name>
  <memory unit='MiB'>{self.memory_mib}</memory>
  <vcpu>{self.vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(self.kernel))}</kernel>
    <initrd>{escape(str(self.initrd))}</initrd>
    <cmdline>{escape(self.cmdline)}</cmdline>
  </os>
  <sysinfo type='fwcfg'><entry name='opt/testbed/identity' file={quoteattr(str(self.identity_file))}/></sysinfo>
  <features><acpi/></features>
  {cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe' discard='unmap'/>
      <source file={quoteattr(str(self.disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    {nics}
    <serial type='file'><source path={quoteattr(str(self.console_log))}/><target port='0'/></serial>
    <console type='file'><source path={quoteattr(str(self.console_log))}/><target type='serial' port='0'/></console>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""


def start_domain(state: LabState, d: L1Domain, save: Callable[[], None]) -> int:
    """Start ``d`` as a transient domain (recorded first); returns its QEMU's PID (recorded too)."""
    if state.libvirt_uri is None:
        raise LabError(f"no libvirtd recorded for lab {state.name}")
    lv = _libvirt()
    conn = open_connection(state.libvirt_uri)
    if conn is None:
        raise LabError(f"libvirtd at {state.libvirt_uri} stopped answering before L1 host VM {d.name} was started",
                       hint=f"see libvirtd.log in the lab's directory; `testbed --lab {state.name} lab down`, "
                            "then `lab up` again")
    try:
        state.libvirt_domains.append(d.name)
        save()
        try:
            dom = conn.createXML(d.xml(), 0)
        except lv.libvirtError as err:
            raise LabError(f"libvirt could not start L1 host VM {d.name}: {err.get_error_message()}",
                           hint="see the domain's log under /var/log/libvirt/qemu/ and the console log "
                                f"{d.console_log}") from err
        pid = 0
        pidfile = RUN_DIR / "qemu" / f"{d.name}.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().strip() or 0)
        if pid:
            state.processes.append(ProcessRecord(role=f"l1 {d.name}", pid=pid, starttime=proc_starttime(pid) or 0))
            save()
        return pid if dom.isActive() else 0
    finally:
        conn.close()


def domain_running(state: LabState, name: str) -> bool | None:
    """Whether domain ``name`` runs (None: libvirtd does not answer)."""
    if state.libvirt_uri is None:
        return None
    lv = _libvirt()
    conn = open_connection(state.libvirt_uri)
    if conn is None:
        return None
    try:
        return bool(conn.lookupByName(name).isActive())
    except lv.libvirtError:
        return False
    finally:
        conn.close()


def release(state: LabState) -> list[str]:
    """Before the lab's processes are stopped: destroy its L1 VMs; keep a libvirtd that others still use.

    Returns what it could not do cleanly (for ``lab down``'s report).
    """
    notes: list[str] = []
    if not state.libvirt_domains and not state.libvirtd_started:
        return notes
    lv = _libvirt()
    conn = open_connection(state.libvirt_uri) if state.libvirt_uri else None
    if conn is None:
        if state.libvirt_domains:
            notes.append(f"libvirtd at {state.libvirt_uri} did not answer: the L1 VMs "
                         f"{', '.join(state.libvirt_domains)} are stopped by their recorded QEMU PIDs")
        return notes
    try:
        for name in state.libvirt_domains:
            try:
                conn.lookupByName(name).destroy()
            except lv.libvirtError as err:
                if err.get_error_code() != lv.VIR_ERR_NO_DOMAIN:
                    notes.append(f"destroying L1 VM {name} failed: {err.get_error_message()}")
        ours = set(state.libvirt_domains)
        others = [d.name() for d in conn.listAllDomains() if d.name() not in ours]
    finally:
        conn.close()
    if state.libvirtd_started and others:
        rec = next((p for p in state.processes if p.role == ROLE), None)
        state.processes = [p for p in state.processes if p.role != ROLE]
        notes.append(f"left the libvirtd this lab started (pid {rec.pid if rec else '?'}) running: "
                     f"it also runs {', '.join(others)}")
        state.libvirtd_started = False
    return notes


def cleanup_after(state: LabState) -> list[str]:
    """After the lab's processes are gone: the root-namespace links, and /run/libvirt if ours made it."""
    notes: list[str] = []
    for link in state.root_links:
        if Path(f"/sys/class/net/{link}").exists():
            p = run(["ip", "link", "del", "dev", link], check=False)
            if p.returncode != 0 and Path(f"/sys/class/net/{link}").exists():
                notes.append(f"left interface {link}: {p.stderr.strip()}")
    rec = next((p for p in state.processes if p.role == ROLE), None)
    if state.libvirtd_started and state.libvirt_run_dir_created and not (rec and record_alive(rec)):
        shutil.rmtree(RUN_DIR, ignore_errors=True)
    return notes
