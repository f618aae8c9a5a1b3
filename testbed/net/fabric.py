"""The lab's wiring, named in one place.

Sites, vCenters, the observer and the WAN are wired here; a host's part is its kind's (``HostWiring``, the
kinds are ``testbed.lab.kinds``): the loops over a lab's hosts ask each host's kind for its root links, root
bridges, veths to its site and its own configuration, built from the primitives here.

Namespaces (lab ``L``): ``L-<site>`` is a site's switch and router,
``L-<host>`` a host, ``L-<vcenter>`` a vCenter's management station,
``L-wan`` the site-to-site link, ``L-obs`` the heartbeat observer.

Inside a site namespace: bridges ``br-mgmt`` and ``br-vmk`` (management and
vMotion networks, routed; the site is their gateway, .1) and one bridge
``pg<i>`` per port group (the VM networks). ``wan0`` is the site's leg of the
site-to-site link (transit network 198.18.254.0/24); its egress queue is the
link's bandwidth cap in that direction. Port groups are stretched across sites
at L2 by VXLAN (``vx<i>``, VNI 1000+i, between the sites' transit addresses), so
VM traffic between sites crosses the same shaped link as everything else.
Host ``h`` plugs in at ports ``p<h>m``, ``p<h>v``, ``p<h>u<i>``; the vCenter at
``vc0``; the observer at ``obs<i>`` (one leg per port group, site 0).

Inside a host namespace: ``vmk0`` (management), ``vmk1`` (vMotion), bridges
``pg<i>`` with uplinks ``up<i>``, VM taps ``t<n>-<vm>`` as their ports.
A nested host (an L1 VM, ``testbed.hosts.nested``) has no namespace: each of its
NICs is a libvirt tap on a root-namespace bridge ``<lab>_<s><hh><r>`` (no address,
no IPv6), joined to the site's port by a veth whose root end is ``<lab>-<s><hh><r>``
(``s`` site index and ``hh`` host number in hex, ``r`` = ``m``, ``v`` or ``u<i>``);
inside the VM the NICs get the netns host's names (``testbed.hosts.provision``).
Inside ``L-wan``: bridge ``br-wan`` with one port ``s-<site>`` per site; on a kernel
without netem, while the link has delay, jitter or loss, the delay line ``tb-wan``
takes the two ports off the bridge and forwards between them (``net.wan``).

This kernel has no 802.1Q VLANs (neither VLAN devices nor bridge VLAN
filtering), so port groups are separate bridges rather than VLAN ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from testbed.lab import topology as topo
from testbed.net import wan
from testbed.net.cmd import ip_batch, run

VXLAN_PORT = 4789
OBSERVER_MAC = "02:00:c6:13:00:02"     # locally administered; 198.19.0.2
VXLAN_OVERHEAD = 50


def ns_name(lab: str, node: str) -> str:
    return f"{lab}-{node}"


def pg_bridge(index: int) -> str:
    return f"pg{index}"


def veth(a_ns: str, a: str, b_ns: str, b: str, mtu: int = 1500) -> str:
    return f"link add name {a} netns {a_ns} mtu {mtu} type veth peer name {b} netns {b_ns} mtu {mtu}"


def sysctl(netns: str, *settings: str) -> None:
    run(["sysctl", "-q", "-w", *settings], netns=netns)


def wan_mtu(t: topo.Topology) -> int:
    return t.link.mtu + VXLAN_OVERHEAD


def l1_ports(t: topo.Topology, si: int, hi: int) -> list[tuple[str, str, str, str, int]]:
    """A nested host's NICs: (role, root bridge, root veth end, site port, MTU), role vmk0/vmk1/up<i>."""
    lab, mtu = t.name, t.link.mtu
    roles = [("vmk0", "m", f"p{hi}m", 1500), ("vmk1", "v", f"p{hi}v", mtu)]
    roles += [(f"up{i}", f"u{i}", f"p{hi}u{i}", mtu) for i in range(len(t.port_groups))]
    return [(role, f"{lab}_{si:x}{hi:02x}{r}", f"{lab}-{si:x}{hi:02x}{r}", port, m) for role, r, port, m in roles]


class RootBridges(NamedTuple):
    """Root-namespace ``ip`` commands for a host's bridges: make them, then (after ``sysctls``) bring them up."""

    make: list[str]
    sysctls: list[str]
    up: list[str]


class HostWiring(Protocol):
    """What the loops below ask of a host's kind (``testbed.lab.kinds``): ``(t, si, hi, host)`` is the host and
    where it sits (site index, host index from 1), as ``Topology.hosts()`` gives them."""

    def root_links(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> list[str]: ...
    def root_bridges(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> RootBridges: ...
    def site_links(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> list[str]: ...
    def configure(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> None: ...


KindOf = Callable[[topo.HostSpec], HostWiring]


def l1_root_links(t: topo.Topology, si: int, hi: int) -> list[str]:
    """A nested host's root-namespace interfaces: each NIC's bridge and veth end."""
    return [n for _, br, end, _, _ in l1_ports(t, si, hi) for n in (br, end)]


def l1_root_bridges(t: topo.Topology, si: int, hi: int) -> RootBridges:
    """A nested host's root-namespace bridges: no address, IPv6 off before they come up."""
    ports = l1_ports(t, si, hi)
    return RootBridges(
        make=[f"link add name {br} mtu {mtu} type bridge" for _, br, _, _, mtu in ports],
        sysctls=[s for _, br, end, _, _ in ports
                 for s in (f"net.ipv6.conf.{br}.disable_ipv6=1", f"net.ipv6.conf.{end}.disable_ipv6=1")],
        up=[c for _, br, end, _, _ in ports
            for c in (f"link set {end} master {br}", f"link set {end} up", f"link set {br} up")])


def l1_site_links(t: topo.Topology, si: int, hi: int) -> list[str]:
    """A nested host's veths: root end (its NIC's bridge joins it) to the site's port."""
    sns = ns_name(t.name, t.sites[si].name)
    return [f"link add name {end} mtu {m} type veth peer name {port} netns {sns} mtu {m}"
            for _, _, end, port, m in l1_ports(t, si, hi)]


def host_site_links(t: topo.Topology, si: int, hi: int, host: str) -> list[str]:
    """A namespace host's veths to its site: ``vmk0``, ``vmk1``, ``up<i>`` to ``p<h>m``, ``p<h>v``, ``p<h>u<i>``."""
    hns, sns, mtu = ns_name(t.name, host), ns_name(t.name, t.sites[si].name), t.link.mtu
    return ([veth(hns, "vmk0", sns, f"p{hi}m"), veth(hns, "vmk1", sns, f"p{hi}v", mtu)]
            + [veth(hns, f"up{i}", sns, f"p{hi}u{i}", mtu) for i in range(len(t.port_groups))])


def root_links(t: topo.Topology, kind_of: KindOf) -> list[str]:
    """Every root-namespace interface the hosts of ``t`` need (bridges and veth ends)."""
    return [n for si, _, hi, h in t.hosts() for n in kind_of(h).root_links(t, si, hi, h)]


def root_bridges(t: topo.Topology, kind_of: KindOf) -> RootBridges:
    """The root-namespace bridges of every host of ``t``: all made, then all sysctls, then all up."""
    each = [kind_of(h).root_bridges(t, si, hi, h) for si, _, hi, h in t.hosts()]
    return RootBridges(make=[c for b in each for c in b.make], sysctls=[s for b in each for s in b.sysctls],
                       up=[c for b in each for c in b.up])


def link_commands(t: topo.Topology, wan_ns: str | None, kind_of: KindOf) -> list[str]:
    """Root-namespace ``ip`` commands creating every veth pair of the lab (namespaces must exist)."""
    lab, mtu, cmds = t.name, t.link.mtu, []
    for si, site in enumerate(t.sites):
        sns = ns_name(lab, site.name)
        for hi, host in enumerate(site.hosts, start=1):
            cmds += kind_of(host).site_links(t, si, hi, host)
        cmds.append(veth(ns_name(lab, site.vcenter.name), "eth0", sns, "vc0"))
        if si == 0:   # the observer has a leg on every port group (a monitoring network reaching all zones)
            cmds += [veth(ns_name(lab, "obs"), f"eth{i}", sns, f"obs{i}", mtu) for i in range(len(t.port_groups))]
        if wan_ns is not None:
            cmds.append(veth(sns, "wan0", wan_ns, f"s-{site.name}"[:15], wan_mtu(t)))
    return cmds


def configure_site(t: topo.Topology, si: int, with_wan: bool, kind_of: KindOf) -> None:
    """Addresses, bridges, routes and VXLAN of site ``si`` and of its hosts (as their kinds configure themselves)
    and vCenter."""
    site, lab, mtu = t.sites[si], t.name, t.link.mtu
    sns = ns_name(lab, site.name)
    r = topo.site_router_addresses(si)
    npg = len(t.port_groups)
    cmds = ["link set lo up",
            "link add br-mgmt type bridge", f"addr add {r['mgmt']} dev br-mgmt",
            "link add br-vmk type bridge", f"addr add {r['vmotion']} dev br-vmk"]
    cmds += [f"link add {pg_bridge(i)} type bridge" for i in range(npg)]
    for hi, host in enumerate(site.hosts, start=1):
        cmds += [f"link set p{hi}m master br-mgmt", f"link set p{hi}v master br-vmk",
                 f"link set p{hi}m up", f"link set p{hi}v up"]
        cmds += [c for i in range(npg) for c in (f"link set p{hi}u{i} master {pg_bridge(i)}",
                                                  f"link set p{hi}u{i} up")]
        kind_of(host).configure(t, si, hi, host)
    cmds += ["link set vc0 master br-mgmt", "link set vc0 up"]
    if si == 0:
        cmds += [c for i in range(npg) for c in (f"link set obs{i} master {pg_bridge(i)}", f"link set obs{i} up")]
    if with_wan:
        cmds += [f"addr add {r['transit']} dev wan0", "link set wan0 up"]
        local = r["transit"].split("/")[0]
        for i in range(npg):
            cmds += [f"link add vx{i} mtu {mtu} type vxlan id {1000 + i} local {local} dstport {VXLAN_PORT} "
                     "nolearning", f"link set vx{i} master {pg_bridge(i)}", f"link set vx{i} up"]
        for sj in range(len(t.sites)):
            if sj != si:
                via = topo.site_router_addresses(sj)["transit"].split("/")[0]
                cmds += [f"route add 198.18.{sj}.0/24 via {via}", f"route add 198.18.{16 + sj}.0/24 via {via}"]
    cmds += [f"link set br-vmk mtu {mtu}", "link set br-mgmt up", "link set br-vmk up"]
    cmds += [f"link set {pg_bridge(i)} up" for i in range(npg)]
    ip_batch(cmds, netns=sns)
    sysctl(sns, "net.ipv4.ip_forward=1")
    if with_wan:
        fdb = [f"fdb append 00:00:00:00:00:00 dev vx{i} dst {topo.site_router_addresses(sj)['transit'].split('/')[0]}"
               for i in range(npg) for sj in range(len(t.sites)) if sj != si]
        run(["bridge", "-n", sns, "-batch", "-"], input="\n".join(fdb) + "\n")
    vns = ns_name(lab, site.vcenter.name)
    ip_batch(["link set lo up", f"addr add {topo.vcenter_address(si)} dev eth0", "link set eth0 up",
              f"route add default via {r['mgmt'].split('/')[0]}"], netns=vns)
    if si == 0:
        # The observer's address lives on eth0 (the first port group); the other legs answer ARP for it
        # (arp_ignore 0) and take heartbeats in (no reverse-path filter), so a VM in any port group is
        # observed, while pings from the observer leave by one leg only: that port group's reachability.
        # All legs share one MAC: a guest that moves to another port group keeps its ARP entry for the
        # observer, and its heartbeats are taken in by the leg of its new segment at once.
        ons = ns_name(lab, "obs")
        ip_batch(["link set lo up", f"addr add {topo.OBSERVER_IP}/{topo.VM_NETWORK.prefixlen} dev eth0"]
                 + [c for i in range(npg) for c in (f"link set eth{i} address {OBSERVER_MAC}",
                                                     f"link set eth{i} up")], netns=ons)
        sysctl(ons, "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
               *(f"net.ipv4.conf.eth{i}.rp_filter=0" for i in range(npg)))


def configure_host(t: topo.Topology, si: int, hi: int, host: str) -> None:
    """A namespace host's addresses, routes and port-group bridges."""
    a = topo.host_addresses(si, hi)
    cmds = ["link set lo up",
            f"addr add {a.mgmt} dev vmk0", "link set vmk0 up",
            f"addr add {a.vmotion} dev vmk1", "link set vmk1 up",
            f"route add default via {a.mgmt_gateway}",
            f"route add 198.18.16.0/20 via {a.vmotion_gateway}"]
    for i in range(len(t.port_groups)):
        cmds += [f"link add {pg_bridge(i)} type bridge", f"link set up{i} master {pg_bridge(i)}",
                 f"link set up{i} up", f"link set {pg_bridge(i)} up"]
    ip_batch(cmds, netns=ns_name(t.name, host))


def configure_wan(t: topo.Topology, wan_ns: str) -> None:
    cmds = ["link set lo up", "link add br-wan type bridge", "link set br-wan up"]
    for site in t.sites:
        port = wan.leg(site.name)
        cmds += [f"link set {port} master br-wan", f"link set {port} up"]
    ip_batch(cmds, netns=wan_ns)


def shape_link(t: topo.Topology, bandwidth_bps: int | None) -> None:
    """Cap the site-to-site link at ``bandwidth_bps`` bytes/s in each direction (None: uncap).

    Each site's ``wan0`` egress carries everything that leaves the site
    (routed, and the port groups inside VXLAN), so one token bucket per
    direction caps the whole link.
    """
    for site in t.sites:
        sns = ns_name(t.name, site.name)
        if bandwidth_bps is None:
            run(["tc", "-n", sns, "qdisc", "del", "dev", "wan0", "root"], check=False)
            continue
        burst = max(bandwidth_bps // 100, 64 * 1024)   # 10 ms of traffic, at least 64 KiB
        run(["tc", "-n", sns, "qdisc", "replace", "dev", "wan0", "root", "tbf",
             "rate", f"{bandwidth_bps * 8}bit", "burst", str(burst), "latency", "50ms"])


def set_link_state(t: topo.Topology, up: bool) -> None:
    """Cut (``up=False``) or restore the site-to-site link: the WAN's leg to each site goes down or up.

    The cut is inside the WAN namespace, like a fibre cut: each site's ``wan0`` only loses its
    carrier, so its routes to the other sites stay (taking ``wan0`` itself down would delete
    them, and a restore would leave the sites unreachable); traffic is dropped silently.
    """
    ip_batch([f"link set {wan.leg(site.name)} {'up' if up else 'down'}" for site in t.sites],
             netns=ns_name(t.name, "wan"))
