"""``testbed lab attach --vagrant``: the Vagrant lab's hosts added to the testbed's vCenters.

``vagrant up`` (the Vagrantfile) makes the L1 hosts and their networks with vagrant-libvirt: per site a
management and a vMotion network (``tb-<lab>-mgmt<s>``, ``tb-<lab>-vmk<s>``, routed by the workstation,
which is each network's ``.1``) and one VM network (``tb-<lab>-pg0``), and provisions each host with
the identity the nested host kind uses (``testbed.hosts.vagrant``). ``attach`` then:

1. asks Vagrant which hosts run (``vagrant status --machine-readable``) and how to reach them
   (``vagrant ssh-config``): every host of the lab must be running and reachable;
2. records a lab (state, as ``lab up`` does) with a namespace per vCenter, plugged into its site's
   management network (its bridge found through libvirt), and the heartbeat observer on the VM network;
3. starts the two vCenters there and adds every host to its site's vCenter through the API with
   the host's root password, exactly as for the other host kinds.

``testbed --lab <lab> lab down`` removes what ``attach`` made (namespaces, processes, names); the
Vagrant VMs stay (``vagrant destroy`` removes them).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import Conflict, InputError, LabError, NotFound
from testbed.hosts import vagrant as vg
from testbed.lab import builder
from testbed.lab import topology as topo
from testbed.lab.state import LabState, StateFile
from testbed.net import fabric
from testbed.net.cmd import netns_exists, run
from testbed.vcenter import deploy


@dataclass(frozen=True)
class SshEntry:
    host: str
    hostname: str
    port: int
    user: str
    identity_file: str | None


def _vagrant(vdir: Path, *args: str) -> str:
    return vg.run(vdir, *args, hint=f"is {vdir} the directory of the Vagrantfile, and the lab up (`vagrant up`)?")


def machine_states(text: str) -> dict[str, str]:
    """``vagrant status --machine-readable`` -> {machine: state}."""
    states: dict[str, str] = {}
    for line in text.splitlines():
        f = line.split(",")
        if len(f) >= 4 and f[2] == "state" and f[1]:
            states[f[1]] = f[3]
    return states


def parse_ssh_config(text: str) -> dict[str, SshEntry]:
    """``vagrant ssh-config`` (OpenSSH client configuration blocks) -> {host: entry}."""
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        key, value = key.lower(), value.strip().strip('"')
        if key == "host":
            current = blocks.setdefault(value, {})
        elif current is not None:
            current.setdefault(key, value)
    out = {}
    for host, b in blocks.items():
        if "hostname" not in b:
            raise InputError(f"`vagrant ssh-config`: host {host} has no HostName")
        out[host] = SshEntry(host=host, hostname=b["hostname"], port=int(b.get("port", "22")),
                             user=b.get("user", "root"), identity_file=b.get("identityfile"))
    return out


def vagrant_hosts(vdir: Path, t: topo.Topology) -> dict[str, SshEntry]:
    """The lab's hosts as Vagrant sees them; every one must be running."""
    want = [h.name for *_, h in t.hosts()]
    states = machine_states(_vagrant(vdir, "status", "--machine-readable"))
    down = {h: states.get(h, "not created") for h in want if states.get(h) != "running"}
    if down:
        raise LabError("the Vagrant lab is not up: " + ", ".join(f"{h} is {s}" for h, s in down.items()),
                       hint=f"run `vagrant up` in {vdir} (see README, 'The Vagrant lab')")
    entries = parse_ssh_config(_vagrant(vdir, "ssh-config", *want))
    missing = [h for h in want if h not in entries]
    if missing:
        raise LabError(f"`vagrant ssh-config` does not list {', '.join(missing)}",
                       hint="is this the testbed's Vagrantfile?")
    return entries


def network_bridge(name: str) -> str:
    """The bridge of a libvirt network (the machine's libvirtd)."""
    from testbed.lab import libvirt_host
    conn = libvirt_host.open_connection(libvirt_host.uri())
    try:
        return str(conn.networkLookupByName(name).bridgeName())
    except Exception as err:
        raise LabError(f"libvirt network {name} does not exist: {err}",
                       hint="`vagrant up` creates it; is the Vagrant lab up?") from err
    finally:
        conn.close()


def _wire(t: topo.Topology, state: LabState, sf: StateFile) -> None:
    """vCenter namespaces on their sites' management networks, the observer on the VM network."""
    lab = t.name
    plan: list[tuple[str, str, str, str | None]] = []   # namespace, bridge, address, gateway
    for si, site in enumerate(t.sites):
        plan.append((fabric.ns_name(lab, site.vcenter.name), network_bridge(f"tb-{lab}-mgmt{si}"),
                     topo.vcenter_address(si), topo.site_router_addresses(si)["mgmt"].split("/")[0]))
    plan.append((fabric.ns_name(lab, "obs"), network_bridge(f"tb-{lab}-pg0"), f"{topo.OBSERVER_IP}/16", None))
    taken = [ns for ns, *_ in plan if netns_exists(ns)]
    if taken:
        raise Conflict("network namespaces already exist: " + ", ".join(taken),
                       hint=f"`testbed --lab {lab} lab down` first")
    state.namespaces = [ns for ns, *_ in plan]
    sf.save(state)
    run(["ip", "-batch", "-"], input="".join(f"netns add {ns}\n" for ns, *_ in plan))
    ends = [f"{lab}-at{i}"[:15] for i in range(len(plan))]
    for end, (ns, bridge, addr, gw) in zip(ends, plan, strict=True):
        run(["ip", "link", "add", "name", end, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["sysctl", "-q", "-w", f"net.ipv6.conf.{end}.disable_ipv6=1"])
        run(["ip", "link", "set", end, "master", bridge, "up"])
        cmds = ["link set lo up", f"addr add {addr} dev eth0", "link set eth0 up"]
        if gw:
            cmds.append(f"route add default via {gw}")
        run(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n")
    # vagrant-libvirt's bridges run STP (libvirt: 2 s forward delay): a new port drops every frame until it is
    # forwarding (about 4 s), and a vCenter that connects at once to its hosts gets "Unable to connect"
    deadline = time.monotonic() + 60
    while waiting := [e for e in ends if _port_state(e) not in (None, 3)]:
        if time.monotonic() > deadline:
            raise LabError(f"bridge ports {', '.join(waiting)} did not reach the forwarding state within 60 s",
                           hint="see `bridge link`; `testbed --lab vg lab down` removes them")
        time.sleep(0.2)


def _port_state(link: str) -> int | None:
    """The STP state of a bridge port (3: forwarding), None where the bridge runs no STP state machine."""
    try:
        return int(Path(f"/sys/class/net/{link}/brport/state").read_text())
    except (OSError, ValueError):
        return None


def _wait_ssh(address: str, host: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((address, 22), timeout=2):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise LabError(f"host {host}'s SSH server at {address}:22 did not answer within {timeout_s:.0f} s "
                               f"after `vagrant up`: {err}",
                               hint=f"see its console (`vagrant ssh {host}`, `virsh console`); then attach again") \
                    from err
            time.sleep(1)


async def attach(vdir: Path, lab: str = "vg") -> tuple[dict[str, float], dict[str, SshEntry]]:
    """Attach the Vagrant lab in ``vdir`` (its hosts running) to two new vCenters.

    Returns timings in seconds and how Vagrant reaches each host."""
    t0 = time.monotonic()
    t = vg.topology(lab)
    entries = await asyncio.to_thread(vagrant_hosts, vdir, t)
    paths = builder.LabPaths(lab)
    for *_, h in t.hosts():
        if not (paths.host_dir(h.name) / "root-password").exists():
            raise NotFound(f"host {h.name} has no identity in {paths.dir} (made when the Vagrantfile provisions it)",
                           hint=f"run `vagrant provision` in {vdir}")
    sf = StateFile(paths.dir)
    with sf.locked():
        if sf.exists():
            raise Conflict(f"lab {lab!r} is already up or attached", hint=f"`testbed --lab {lab} lab down` first")
        # the hosts' identities were made for `vagrant up` (testbed.hosts.vagrant): `lab down` leaves them
        state = LabState(name=lab, topology=t, created_s=time.time(), kept_paths=[
            paths.key.name, paths.key.with_suffix(".pub").name, "hosts"])
        sf.save(state)
    try:
        builder.name_service(t, state, sf)   # the vCenters' namespaces (a nested-kind host has none)
        await asyncio.to_thread(_wire, t, state, sf)
        paths.known_hosts.write_text("".join(
            f"{topo.host_addresses(si, hi).mgmt.split('/')[0]} "
            f"{' '.join((paths.host_dir(h.name) / 'ssh_host_ed25519_key.pub').read_text().split()[:2])}\n"
            for si, _, hi, h in t.hosts()))
        builder.start_observer(t, state, sf, paths)
        builder.mark_up(lab)
        t1 = time.monotonic()
        for si in range(len(t.sites)):
            await asyncio.to_thread(deploy.init, t, si, secrets.token_bytes(32), secrets.token_urlsafe(12))
        await asyncio.gather(*(asyncio.to_thread(deploy.start, lab, s.vcenter.name) for s in t.sites))
        t2 = time.monotonic()

        # `vagrant up` returns once each host is provisioned; its sshd on the management address (which the
        # provisioning set) can take a few seconds more on a busy machine
        await asyncio.gather(*(asyncio.to_thread(_wait_ssh, topo.host_addresses(si, hi).mgmt.split("/")[0], h.name)
                               for si, _, hi, h in t.hosts()))

        def add(site: topo.SiteSpec, h: topo.HostSpec) -> None:
            with deploy.client(lab, site.vcenter.name) as c:
                c.post("/api/vcenter/host", {"hostname": topo.fqdn(t, h.name), "user_name": "root",
                                             "password": deploy.root_password(lab, h.name)})
        await asyncio.gather(*(asyncio.to_thread(add, s, h) for s in t.sites for h in s.hosts))
    except BaseException:
        await asyncio.to_thread(builder.teardown, lab)
        raise
    t3 = time.monotonic()
    return {"wiring_s": t1 - t0, "vcenters_s": t2 - t1, "add_hosts_s": t3 - t2, "total_s": t3 - t0}, entries
