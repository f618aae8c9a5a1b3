"""A host's identity, and applying it on the host: the provisioning shared by the nested and Vagrant kinds.

``HostIdentity`` is everything that makes a booted host image one particular
lab host: name, NICs (found by MAC, renamed to the netns host's names ``vmk0``,
``vmk1``, ``up<i>`` under bridge ``pg<i>``), addresses and routes, /etc/hosts,
root password (hashed), authorized keys, SSH host key, sysctls and the agent's
configuration. The lab side builds it (``testbed.hosts.nested``); on the host,
``testbed-provision`` applies it: at boot from QEMU's fw_cfg entry
``opt/testbed/identity`` (nested hosts, delivered by libvirt), or over SSH with
``testbed-provision apply FILE`` (the Vagrant lab's provisioner). Runs on the
host image's own Python: standard library, pydantic and the agent's config only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from testbed.hostd.config import HostConfig

FW_CFG_NAME = "opt/testbed/identity"
FW_CFG_PATH = Path("/sys/firmware/qemu_fw_cfg/by_name") / FW_CFG_NAME / "raw"
IDENTITY_FILE = Path("/etc/testbed/identity.json")
HOSTD_CONFIG = Path("/etc/testbed/hostd.json")
HOSTD = "/usr/local/bin/testbed-hostd"
# Where the built-in L2 guest image lives on a host made from the host image.
HOST_GUEST_IMAGE_DIR = "/usr/share/testbed/guest"
HOST_AGENT_DIR = "/var/lib/testbed/hostd"
HOST_DATASTORES_DIR = "/var/lib/testbed/datastores"


class Nic(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str                 # vmk0, vmk1, up<i>: the netns host's names
    mac: str
    address: str | None = None    # CIDR
    bridge: str | None = None     # the port group bridge this uplink joins
    mtu: int = 1500


class Route(BaseModel):
    model_config = ConfigDict(frozen=True)
    dest: str                 # "default" or a CIDR
    via: str


class HostIdentity(BaseModel):
    model_config = ConfigDict(frozen=True)
    hostname: str
    fqdn: str
    nics: tuple[Nic, ...]
    routes: tuple[Route, ...] = ()
    hosts_file: str = ""
    root_password_sha512: str            # crypt(3) $6$ hash
    authorized_keys: tuple[str, ...] = ()
    ssh_host_ed25519_key: str | None = None   # OpenSSH private key; None: the host makes its own
    sysctls: dict[str, str] = {}
    hostd: HostConfig


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {p.returncode}): {p.stderr.strip()}")
    return p


def _nics_by_mac() -> dict[str, str]:
    out = {}
    for d in Path("/sys/class/net").iterdir():
        try:
            out[(d / "address").read_text().strip().lower()] = d.name
        except OSError:
            continue
    return out


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def apply(ident: HostIdentity, *, log: bool = True) -> None:
    """Make this machine the host ``ident`` describes. Idempotent: boot and re-provisioning run it again."""
    def say(msg: str) -> None:
        if log:
            print(f"testbed-provision: {msg}", file=sys.stderr)

    _write(Path("/etc/hostname"), ident.hostname + "\n")
    _run("hostname", ident.hostname, check=False)
    if ident.hosts_file:
        _write(Path("/etc/hosts"), ident.hosts_file)

    have = _nics_by_mac()
    for nic in ident.nics:
        cur = have.get(nic.mac.lower())
        if cur is None:
            raise RuntimeError(f"no NIC with MAC {nic.mac} (for {nic.name}); NICs here: {have}")
        if cur != nic.name:
            _run("ip", "link", "set", "dev", cur, "down")
            _run("ip", "link", "set", "dev", cur, "name", nic.name)
        _run("ip", "link", "set", "dev", nic.name, "mtu", str(nic.mtu))
        _run("sysctl", "-q", "-w", f"net.ipv6.conf.{nic.name}.disable_ipv6=1", check=False)
        if nic.bridge:
            if not Path(f"/sys/class/net/{nic.bridge}").exists():
                _run("ip", "link", "add", "name", nic.bridge, "type", "bridge")
            _run("sysctl", "-q", "-w", f"net.ipv6.conf.{nic.bridge}.disable_ipv6=1", check=False)
            _run("ip", "link", "set", "dev", nic.name, "master", nic.bridge)
            _run("ip", "link", "set", "dev", nic.bridge, "up")
        if nic.address:
            _run("ip", "addr", "replace", nic.address, "dev", nic.name)
        _run("ip", "link", "set", "dev", nic.name, "up")
        say(f"{nic.name} ({nic.mac}) {nic.address or ''}{' in ' + nic.bridge if nic.bridge else ''}")
    for r in ident.routes:
        _run("ip", "route", "replace", r.dest, "via", r.via)
    for k, v in ident.sysctls.items():
        _run("sysctl", "-q", "-w", f"{k}={v}", check=False)

    _run("usermod", "-p", ident.root_password_sha512, "root")
    ssh_dir = Path("/root/.ssh")
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    ak = ssh_dir / "authorized_keys"
    lines = ak.read_text().splitlines() if ak.exists() else []
    lines += [k for k in ident.authorized_keys if k not in lines]
    _write(ak, "\n".join(lines) + "\n", 0o600)
    if ident.ssh_host_ed25519_key:
        key = Path("/etc/ssh/ssh_host_ed25519_key")
        _write(key, ident.ssh_host_ed25519_key.rstrip("\n") + "\n", 0o600)
        pub = _run("ssh-keygen", "-y", "-f", str(key)).stdout.strip()
        _write(key.with_suffix(".pub"), f"{pub} root@{ident.hostname}\n")
    else:
        _run("ssh-keygen", "-A")

    for d in ident.hostd.datastores:
        Path(d.path).mkdir(parents=True, exist_ok=True)
    Path(ident.hostd.dir).mkdir(parents=True, exist_ok=True)
    _write(HOSTD_CONFIG, ident.hostd.model_dump_json(indent=1) + "\n")
    _write(IDENTITY_FILE, ident.model_dump_json(indent=1) + "\n", 0o600)
    say(f"host {ident.hostname} provisioned")


def boot() -> int:
    """At boot (before sshd): the identity libvirt gave, else the one applied before, else host keys only."""
    _run("modprobe", "qemu_fw_cfg", check=False)
    for src in (FW_CFG_PATH, IDENTITY_FILE):
        if src.exists():
            apply(HostIdentity.model_validate_json(src.read_bytes()))
            return 0
    _run("ssh-keygen", "-A")
    print("testbed-provision: no identity (fw_cfg or /etc/testbed/identity.json); host keys only",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="testbed-provision", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("boot", help="apply the identity found at boot (fw_cfg, or the last one applied)")
    a = sub.add_parser("apply", help="apply an identity file (JSON), then restart sshd if it runs")
    a.add_argument("file", type=Path)
    sub.add_parser("show", help="print the identity in force (without secrets)")
    args = ap.parse_args(argv)
    if args.cmd == "boot":
        return boot()
    if args.cmd == "apply":
        apply(HostIdentity.model_validate_json(args.file.read_bytes()))
        _run("systemctl", "try-reload-or-restart", "ssh.service", check=False)
        return 0
    ident = json.loads(IDENTITY_FILE.read_text())
    for k in ("root_password_sha512", "ssh_host_ed25519_key"):
        ident.pop(k, None)
    print(json.dumps(ident, indent=1))
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("testbed-provision: must run as root", file=sys.stderr)
        sys.exit(1)
    sys.exit(main())
