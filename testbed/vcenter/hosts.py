"""Hosts: add one (SSH login, this vCenter's key, its agent), refresh, licence, remove; datastores and networks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from testbed.errors import Conflict, HostUnreachable, InputError, TestbedError
from testbed.vcenter import hostconn
from testbed.vcenter.base import VcBase

log = logging.getLogger("testbed.vcenter")


class Hosts(VcBase):
    """The hosts this vCenter manages."""

    async def add_host(self, hostname: str, user: str, password: str, *, thumbprint: str | None = None,
                       cluster: str | None = None, license: str | None = None) -> dict[str, Any]:
        try:
            address = str((await asyncio.get_running_loop().getaddrinfo(hostname, 22, family=socket.AF_INET))[0][4][0])
        except socket.gaierror as err:
            raise InputError(f"host name {hostname!r} does not resolve from vCenter {self.cfg.name}: "
                             f"{err.strerror}", hint="give the host's address or a name this vCenter resolves") \
                from err
        for h in self.inv.hosts():
            if h["address"] == address:
                raise Conflict(f"host {hostname} ({address}) is already in vCenter {self.cfg.name} as {h['name']}")
        t0 = time.monotonic()
        added = await hostconn.aadd_host(address, user, password, vc_name=self.cfg.name, pubkey=self.pubkey,
                                        thumbprint=thumbprint)
        hostconn.write_known_host(self.cfg.known_hosts, address, added.host_key)
        t1 = time.monotonic()
        tmp = hostconn.ManagedHost(hostname, address, self.cfg.ssh_key, self.cfg.known_hosts)
        async with self.agent(tmp) as agent:
            facts = await agent.call("host.facts")
        log.info("added host %s: SSH login, key and agent %.2f s; facts %.2f s", hostname, t1 - t0,
                 time.monotonic() - t1)
        name = facts["name"]
        if self.inv.host(name) is not None:
            raise Conflict(f"a host named {name} is already in vCenter {self.cfg.name}")
        row = {"name": name, "address": address, "cluster": cluster or self.cfg.cluster, "state": "connected",
               "license": license or facts.get("license", "enterprise-plus"), "host_key": added.host_key,
               "facts": {**facts, "hostname": hostname, "ssh_fingerprint": added.fingerprint,
                         "agent_pid": added.agent_pid}, "added_s": time.time()}
        self.inv.put_host(row)
        self.inv.event("HostAddedEvent", f"host {name} ({hostname}, {address}) added to {row['cluster']}; "
                       f"SSH key {added.fingerprint}; agent pid {added.agent_pid}", host=name)
        return self.host_summary(row)

    def host_summary(self, h: dict[str, Any]) -> dict[str, Any]:
        f = h["facts"]
        return {"host": h["name"], "name": h["name"], "hostname": f.get("hostname"), "address": h["address"],
                "cluster": h["cluster"], "connection_state": h["state"].upper(), "power_state": "POWERED_ON",
                "license": h["license"], "qemu_version": f.get("qemu_version"), "accel": f.get("accel"),
                "vmotion_address": f.get("vmotion_address"), "ssh_fingerprint": f.get("ssh_fingerprint"),
                "agent_pid": f.get("agent_pid")}

    async def refresh_host(self, name: str) -> dict[str, Any]:
        h = self.inv.host(name)
        assert h is not None
        try:
            async with self.agent(name) as agent:
                facts = await agent.call("host.facts")
            h["facts"] = {**h["facts"], **facts}
            h["state"] = "connected"
        except (HostUnreachable, TestbedError, OSError, TimeoutError) as err:
            h["state"] = "disconnected"
            log.warning("host %s: %s", name, err)
        self.inv.put_host(h)
        return h

    def set_license(self, name: str, edition: str) -> dict[str, Any]:
        h = self.inv.host(name)
        if h is None:
            self.managed(name)   # raises NotFound with the list
            raise AssertionError
        if not edition or not edition.replace("-", "").isalnum():
            raise InputError(f"licence edition {edition!r} is not a name", hint="e.g. enterprise-plus, standard")
        h["license"] = edition
        self.inv.put_host(h)
        self.inv.event("LicenseAssignedEvent", f"host {name} now has licence edition {edition}", host=name)
        return self.host_summary(h)

    async def remove_host(self, name: str) -> None:
        h = self.managed(name)
        on = [v["name"] for v in self.inv.vms() if v["host"] == name]
        if on:
            raise Conflict(f"host {name} still has VMs in vCenter {self.cfg.name}: {', '.join(on)}",
                           hint="move or delete them first")
        with contextlib.suppress(HostUnreachable, TestbedError):
            await hostconn.aforget_vcenter_key(h, self.cfg.name)
        self.inv.delete_host(name)
        self.inv.event("HostRemovedEvent", f"host {name} removed", host=name)

    def datastores(self, host: str | None = None) -> list[dict[str, Any]]:
        out = []
        for h in self.inv.hosts():
            if host and h["name"] != host:
                continue
            for d in h["facts"].get("datastores", []):
                out.append({"datastore": d["name"], "name": d["name"], "host": h["name"], "type": "LOCAL",
                            "capacity": d["capacity_bytes"], "free_space": d["free_bytes"]})
        return out

    def networks(self) -> list[dict[str, Any]]:
        by: dict[str, list[str]] = {}
        for h in self.inv.hosts():
            for p in h["facts"].get("port_groups", []):
                by.setdefault(p["name"], []).append(h["name"])
        return [{"network": n, "name": n, "type": "STANDARD_PORTGROUP", "hosts": hs} for n, hs in sorted(by.items())]
