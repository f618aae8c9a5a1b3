"""The embedded host kind: a network namespace with its own sshd and datastore.

``ssh_target`` is the lab operator's way in: the lab's own key, from the
site's vCenter namespace, so it crosses the management network like a
vCenter's connection would. (The vCenter services use their own keys,
installed when they add the host: ``testbed.vcenter.hostconn``.)
``agent_config`` is the host's own configuration, which ``provision`` writes
where the host's sshd points ``$TESTBED_HOSTD_CONFIG``. (Its wiring and lab
processes are its kind's: ``testbed.lab.kinds.Netns``.)
"""

from __future__ import annotations

import abc

from testbed.hostd.config import DatastoreConfig, HostConfig
from testbed.hosts.base import Host
from testbed.hosts.ssh import SshTarget
from testbed.lab import topology as topo
from testbed.lab.builder import LabPaths
from testbed.lab.state import LabState
from testbed.net import fabric
from testbed.paths import GUEST_IMAGE_DIR, library_items_dir


class LabHost(Host):
    """A host of a lab's topology, of any kind: its addresses, and the lab operator's way in (the lab's own
    key, from the site's vCenter namespace, across the management network)."""

    def __init__(self, state: LabState, name: str) -> None:
        t = state.topology
        si, site, hi, spec = t.host(name)
        super().__init__(name, site.name)
        self.state = state
        self.spec = spec
        self.site_index, self.host_index = si, hi
        self.paths = LabPaths(t.name)
        self.addresses = topo.host_addresses(si, hi)
        self.station_netns = fabric.ns_name(t.name, site.vcenter.name)

    @property
    def mgmt_ip(self) -> str:
        return self.addresses.mgmt.split("/")[0]

    @property
    def vmotion_ip(self) -> str:
        return self.addresses.vmotion.split("/")[0]

    def ssh_target(self) -> SshTarget:
        return SshTarget(host=self.name, address=self.mgmt_ip, key_path=self.paths.key,
                         known_hosts=self.paths.known_hosts, from_netns=self.station_netns)

    @abc.abstractmethod
    def provision(self) -> None:
        """Give the built host its agent's configuration, like installing ESXi on it (``labctl.up``)."""


class NetnsHost(LabHost):
    kind = "netns"

    def __init__(self, state: LabState, name: str) -> None:
        super().__init__(state, name)
        self.netns = fabric.ns_name(state.topology.name, name)

    def provision(self) -> None:
        (self.paths.host_dir(self.name) / "hostd.json").write_text(self.agent_config().model_dump_json(indent=1))

    def agent_config(self) -> HostConfig:
        hd = self.paths.host_dir(self.name)
        t = self.state.topology
        return HostConfig(
            name=self.name, dir=str(hd),
            datastores=tuple(DatastoreConfig(name=d.name, path=str(hd / "datastores" / d.name),
                                             capacity_bytes=d.capacity_bytes)
                             for d in topo.datastores_of(self.spec)),
            port_groups={pg.name: fabric.pg_bridge(i) for i, pg in enumerate(t.port_groups)},
            license=self.spec.license, accel=self.state.accel, accel_reason=self.state.accel_reason,
            mgmt_address=self.mgmt_ip, vmotion_address=self.vmotion_ip, machine_types=self.spec.machine_types,
            guest_image_dir=str(GUEST_IMAGE_DIR),
            import_dirs=tuple(str(library_items_dir(t.name, s.vcenter.name)) for s in t.sites),
        )
