"""The embedded host kind: a network namespace with its own sshd and datastore.

The connection to a host starts from its site's vCenter namespace (the site's
management station), so it crosses the lab's management network like a
vCenter's connection to an ESXi host would.
"""

from __future__ import annotations

import sys

from testbed.hostd.config import DatastoreConfig, HostConfig
from testbed.hosts.base import Host
from testbed.hosts.ssh import SshTarget
from testbed.lab import topology as topo
from testbed.lab.builder import LabPaths
from testbed.lab.state import LabState
from testbed.net import fabric


class NetnsHost(Host):
    kind = "netns"

    def __init__(self, state: LabState, name: str) -> None:
        t = state.topology
        si, site, hi, spec = t.host(name)
        super().__init__(name, site.name)
        self.state = state
        self.spec = spec
        self.paths = LabPaths(t.name)
        self.addresses = topo.host_addresses(si, hi)
        self.netns = fabric.ns_name(t.name, name)
        self.station_netns = fabric.ns_name(t.name, site.vcenter.name)

    @property
    def mgmt_ip(self) -> str:
        return self.addresses.mgmt.split("/")[0]

    @property
    def vmotion_ip(self) -> str:
        return self.addresses.vmotion.split("/")[0]

    @property
    def python(self) -> str:
        return sys.executable

    def ssh_target(self) -> SshTarget:
        return SshTarget(host=self.name, address=self.mgmt_ip, key_path=self.paths.key,
                         known_hosts=self.paths.known_hosts, from_netns=self.station_netns)

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
            mgmt_address=self.mgmt_ip, vmotion_address=self.vmotion_ip,
        )
