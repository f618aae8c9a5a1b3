"""Host kinds as the lab builds them: the classes the build is given, looked up by the topology's ``kind``.

A kind knows its host's place on this machine: its own namespace or none, the root-namespace bridges and veths
it needs, its veths to its site, its addresses, whether the lab runs its sshd and records its agent here, its TCP
buffers and its state. ``testbed.net.fabric`` keeps the primitives and the loops, asking each host's kind
(``of``); ``testbed.lab.builder`` passes ``of`` in. What a host does once built (SSH, its agent, an L1 VM's
boot) is its ``Host`` class in ``testbed.hosts``.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from testbed.lab import libvirt_host
from testbed.lab import topology as topo
from testbed.lab.state import LabState, record_alive
from testbed.net import fabric, wan


class HostKind(abc.ABC):
    """A host kind with nothing of its own on this machine but its veths to its site (the defaults);
    a subclass says what else it has. Implements ``fabric.HostWiring``."""

    name: ClassVar[str]

    def netns(self, lab: str, host: str) -> str | None:
        """The host's own network namespace on this machine (None: it has none)."""
        return None

    def root_links(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> list[str]:
        """Interfaces the host needs in the root namespace (recorded for teardown before they are made)."""
        return []

    def root_bridges(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> fabric.RootBridges:
        return fabric.RootBridges(make=[], sysctls=[], up=[])

    @abc.abstractmethod
    def site_links(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> list[str]:
        """Root-namespace ``ip`` commands making the host's veths to its site's ports."""

    def configure(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> None:
        """Give the host its addresses, routes and bridges (nothing: the host does it itself)."""
        return None

    def sshd_netns(self, lab: str, host: str) -> str | None:
        """Where the lab runs the host's sshd on this machine (None: the host runs its own)."""
        return None

    def agent_netns(self, lab: str, host: str) -> str | None:
        """Where the host's agent runs on this machine, to record it (None: not on this machine)."""
        return None

    def tune_tcp_buffers(self, lab: str, host: str, ceiling: int | None) -> None:
        """Apply the host's TCP buffer ceiling (nothing: the host gets it another way)."""
        return None

    @abc.abstractmethod
    def status(self, state: LabState, host: str) -> str:
        """The host's state for ``lab status``, from what the lab recorded and runs."""


class Netns(HostKind):
    """A network namespace on this machine: veths to its site, its addresses set by the lab, an sshd and an
    agent the lab records, its TCP buffers set in its namespace."""

    name = "netns"

    def netns(self, lab: str, host: str) -> str:
        return fabric.ns_name(lab, host)

    def site_links(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> list[str]:
        return fabric.host_site_links(t, si, hi, host.name)

    def configure(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> None:
        fabric.configure_host(t, si, hi, host.name)

    def sshd_netns(self, lab: str, host: str) -> str:
        return self.netns(lab, host)

    def agent_netns(self, lab: str, host: str) -> str:
        return self.netns(lab, host)

    def tune_tcp_buffers(self, lab: str, host: str, ceiling: int | None) -> None:
        wan.apply_tcp_buffers(self.netns(lab, host), ceiling)

    def status(self, state: LabState, host: str) -> str:
        procs = {p.role: p for p in state.processes}
        sshd, hostd = procs.get(f"sshd {host}"), procs.get(f"hostd {host}")
        if sshd is None or not record_alive(sshd):
            return "sshd-down"
        if hostd is None or not record_alive(hostd):
            return "agent-down" if state.status == "up" else state.status
        return "connected"


class Nested(HostKind):
    """An L1 VM (``testbed.hosts.nested``): no namespace; each NIC a libvirt tap on a root-namespace bridge
    joined to its site's port by a veth. Its addresses, sshd, agent and TCP buffers are its own, set up inside
    it from its identity at boot."""

    name = "nested"

    def root_links(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> list[str]:
        return fabric.l1_root_links(t, si, hi)

    def root_bridges(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> fabric.RootBridges:
        return fabric.l1_root_bridges(t, si, hi)

    def site_links(self, t: topo.Topology, si: int, hi: int, host: topo.HostSpec) -> list[str]:
        return fabric.l1_site_links(t, si, hi)

    def status(self, state: LabState, host: str) -> str:
        running = libvirt_host.domain_running(state, f"{state.topology.name}-{host}")
        return "libvirtd-down" if running is None else "running" if running else "vm-down"


KINDS: dict[str, HostKind] = {k.name: k for k in (Netns(), Nested())}


def of(host: topo.HostSpec) -> HostKind:
    """The kind of ``host``, by the topology's ``kind``."""
    return KINDS[host.kind]


def hosts(t: topo.Topology, kind: type[HostKind]) -> list[topo.HostSpec]:
    """The hosts of ``t`` of that kind, in the topology's order."""
    return [h for *_, h in t.hosts() if isinstance(of(h), kind)]
