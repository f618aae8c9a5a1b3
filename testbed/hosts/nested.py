"""The nested host kind: an L1 VM booted from the host image (images/host) through libvirt.

``check_host_image`` refuses a host image that is missing or stale before
anything is built. ``start`` gives each nested host of a lab a qcow2 overlay of
the image, its identity (``testbed.hosts.provision``, delivered as fw_cfg
``opt/testbed/identity`` and applied by the image at boot) and a transient
libvirt domain whose NICs sit on the lab's networks (``testbed.net.fabric``),
then waits until each answers SSH. From there a nested host is reached and
added to its vCenter exactly like a netns host: SSH from the site's vCenter
namespace, the agent started by ``testbed-hostd serve --daemon``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import HostUnreachable, LabError, NotFound
from testbed.hostd.config import DatastoreConfig, HostConfig
from testbed.hosts import provision as prov
from testbed.hosts.hostimage import agent_sha256
from testbed.hosts.netns import LabHost
from testbed.hosts.ssh import SshSession, SshTarget
from testbed.lab import kinds, libvirt_host
from testbed.lab import topology as topo
from testbed.lab.builder import hosts_file
from testbed.lab.state import LabState, StateFile
from testbed.lab.wanctl import host_buffers
from testbed.net import fabric
from testbed.net.wan import kernel_tcp_buffers
from testbed.paths import GUEST_IMAGE_DIR, REPO_ROOT, lab_dir

HOST_IMAGE_DIR = Path(os.environ.get("TESTBED_HOST_IMAGE", REPO_ROOT / "images" / "host" / "build"))
L1_CMDLINE = ("root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.unified_cgroup_hierarchy=0 "
              "quiet loglevel=4")
BOOT_TIMEOUT_S = float(os.environ.get("TESTBED_L1_BOOT_TIMEOUT", "600"))

@dataclass(frozen=True)
class HostImage:
    dir: Path
    disk: Path
    kernel: Path
    initrd: Path
    manifest: dict[str, object]


def check_host_image(image_dir: Path | None = None) -> HostImage:
    """The host image, or a clear error if it is missing, incomplete or older than the agent or guest here."""
    d = image_dir or HOST_IMAGE_DIR
    fix = "run `make host-image` (about 1.5 min here, docs/nested.md; needs debootstrap: `make setup-host-image`)"
    m_path = d / "manifest.json"
    try:
        manifest = json.loads(m_path.read_text())
    except (OSError, ValueError):
        raise NotFound(f"the host image for nested hosts is not built (no {m_path})", hint=fix) from None
    img = HostImage(dir=d, disk=d / "host.qcow2", kernel=d / "vmlinuz", initrd=d / "initrd.img", manifest=manifest)
    missing = [p.name for p in (img.disk, img.kernel, img.initrd) if not p.is_file()]
    if missing:
        raise NotFound(f"the host image in {d} is incomplete: {', '.join(missing)} missing", hint=fix)
    stale = []
    if manifest.get("agent_sha256") != agent_sha256():
        stale.append("the host agent's sources changed since it was built")
    try:
        guest_key = json.loads((GUEST_IMAGE_DIR / "manifest.json").read_text()).get("cache_key")
    except (OSError, ValueError):
        guest_key = None
    if guest_key and manifest.get("guest_cache_key") != guest_key:
        stale.append("it carries another build of the guest image than images/guest/build")
    if stale:
        raise LabError(f"the host image in {d} is stale: {'; '.join(stale)}", hint=fix)
    return img


class NestedHost(LabHost):
    kind = "nested"

    def __init__(self, state: LabState, name: str) -> None:
        super().__init__(state, name)
        self.domain_name = f"{state.topology.name}-{name}"

    @property
    def dir(self) -> Path:
        return self.paths.host_dir(self.name)

    def ssh_target(self) -> SshTarget:
        return SshTarget(host=self.name, address=self.mgmt_ip, key_path=self.paths.key,
                         known_hosts=self.paths.known_hosts, from_netns=self.station_netns)

    def provision(self) -> None:
        """Nothing yet: the configuration goes with the host's identity when its L1 VM starts (``start``)."""

    def agent_config(self) -> HostConfig:
        t = self.state.topology
        return HostConfig(
            name=self.name, dir=prov.HOST_AGENT_DIR,
            datastores=tuple(DatastoreConfig(name=d.name, path=f"{prov.HOST_DATASTORES_DIR}/{d.name}",
                                             capacity_bytes=d.capacity_bytes)
                             for d in topo.datastores_of(self.spec)),
            port_groups={pg.name: fabric.pg_bridge(i) for i, pg in enumerate(t.port_groups)},
            license=self.spec.license, accel="tcg",
            accel_reason="nested host: guests run under TCG inside the L1 VM",
            mgmt_address=self.mgmt_ip, vmotion_address=self.vmotion_ip, machine_types=self.spec.machine_types,
            guest_image_dir=prov.HOST_GUEST_IMAGE_DIR,
        )

    def macs(self) -> list[tuple[str, str, str, int]]:
        """(role, MAC, root bridge, MTU) of each NIC; locally administered MACs, unique per lab."""
        ports = fabric.l1_ports(self.state.topology, self.site_index, self.host_index)
        return [(role, f"02:7b:{self.site_index:02x}:{self.host_index:02x}:00:{i:02x}", br, mtu)
                for i, (role, br, _, _, mtu) in enumerate(ports)]

    def identity(self) -> prov.HostIdentity:
        t, a = self.state.topology, self.addresses
        nics = []
        for role, mac, _, mtu in self.macs():
            addr = a.mgmt if role == "vmk0" else a.vmotion if role == "vmk1" else None
            bridge = fabric.pg_bridge(int(role[2:])) if role.startswith("up") else None
            nics.append(prov.Nic(name=role, mac=mac, address=addr, bridge=bridge, mtu=mtu))
        shadow = (self.dir / "shadow").read_text().split(":")
        ceiling = host_buffers(self.state).get(self.name)
        sysctls: dict[str, str] = {}
        if ceiling is not None:
            rmem, wmem = kernel_tcp_buffers()
            sysctls = {"net.ipv4.tcp_rmem": f"{rmem[0]} {rmem[1]} {max(rmem[2], ceiling)}",
                       "net.ipv4.tcp_wmem": f"{wmem[0]} {wmem[1]} {max(wmem[2], ceiling)}",
                       "net.ipv4.tcp_slow_start_after_idle": "0"}
        return prov.HostIdentity(
            hostname=self.name, fqdn=topo.fqdn(t, self.name), nics=tuple(nics),
            routes=(prov.Route(dest="default", via=a.mgmt_gateway),
                    prov.Route(dest="198.18.16.0/20", via=a.vmotion_gateway)),
            hosts_file=hosts_file(t), root_password_sha512=shadow[1],
            authorized_keys=(self.paths.key.with_suffix(".pub").read_text().strip(),),
            ssh_host_ed25519_key=(self.dir / "ssh_host_ed25519_key").read_text(),
            sysctls=sysctls, hostd=self.agent_config())

    def domain(self, image: HostImage, kvm: bool) -> libvirt_host.L1Domain:
        return libvirt_host.L1Domain(
            name=self.domain_name, memory_mib=self.spec.l1_memory_mib, vcpus=self.spec.l1_vcpus, kvm=kvm,
            kernel=image.kernel, initrd=image.initrd, cmdline=L1_CMDLINE, disk=self.dir / "l1.qcow2",
            nics=tuple(libvirt_host.L1Nic(mac=mac, bridge=br) for _, mac, br, _ in self.macs()),
            console_log=self.dir / "console.log", identity_file=self.dir / "identity.json")

    def console_tail(self, lines: int = 8) -> str:
        try:
            return " | ".join((self.dir / "console.log").read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no console log)"

    def wait_ssh(self, timeout_s: float = BOOT_TIMEOUT_S) -> float:
        """Block until the L1 VM answers SSH with the lab's key; returns the seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while True:
            try:
                SshSession(self.ssh_target()).close()
                return time.monotonic() - t0
            except HostUnreachable as err:
                last = err
            if libvirt_host.domain_running(self.state, self.domain_name) is False:
                raise LabError(f"L1 host VM {self.domain_name} (host {self.name}) stopped while booting; "
                               f"console: {self.console_tail()}",
                               hint=f"see {self.dir / 'console.log'} and /var/log/libvirt/qemu/{self.domain_name}.log")
            if time.monotonic() > deadline:
                raise LabError(f"host {self.name} (L1 VM {self.domain_name}) did not answer SSH on {self.mgmt_ip} "
                               f"within {timeout_s:.0f} s: {last.message}; console: {self.console_tail()}",
                               hint=f"see {self.dir / 'console.log'}; under TCG a loaded machine boots slowly "
                                    "(raise $TESTBED_L1_BOOT_TIMEOUT)")
            time.sleep(1.0)


def nested_hosts(state: LabState) -> list[NestedHost]:
    return [NestedHost(state, h.name) for h in kinds.hosts(state.topology, kinds.Nested)]


def _overlay(image: HostImage, path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk), str(path)],
                   check=True, capture_output=True)


async def start(state: LabState) -> dict[str, float]:
    """Start the lab's nested hosts (libvirtd first if none runs) and wait until each answers SSH.

    Returns seconds per host from the domain's start to its first SSH login (the L1 boot).
    """
    hosts = nested_hosts(state)
    if not hosts:
        return {}
    image = check_host_image()
    sf = StateFile(lab_dir(state.name))

    def save() -> None:
        with sf.locked():
            saved = sf.load()
            saved.processes, saved.libvirt_uri = state.processes, state.libvirt_uri
            saved.libvirt_domains, saved.libvirtd_started = state.libvirt_domains, state.libvirtd_started
            saved.libvirt_run_dir_created = state.libvirt_run_dir_created
            sf.save(saved)

    await asyncio.to_thread(libvirt_host.ensure_libvirtd, state, lab_dir(state.name), save)
    starts: dict[str, float] = {}
    for h in hosts:
        await asyncio.to_thread(_overlay, image, h.dir / "l1.qcow2")
        ident = h.identity()
        path = h.dir / "identity.json"
        path.touch(mode=0o600)
        path.write_text(ident.model_dump_json())
        starts[h.name] = time.monotonic()
        await asyncio.to_thread(libvirt_host.start_domain, state, h.domain(image, state.accel == "kvm"), save)
    async def boot(h: NestedHost) -> float:
        await asyncio.to_thread(h.wait_ssh)
        return time.monotonic() - starts[h.name]
    booted = await asyncio.gather(*(boot(h) for h in hosts))
    return dict(zip((h.name for h in hosts), booted, strict=True))
