"""What every part of a vCenter stands on: its configuration, inventory, keys, the kept-open connection to
each host's agent, and the claims that keep two operations off one VM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import Conflict, NotFound, TestbedError
from testbed.hosts.agent import AgentClient
from testbed.hosts.base import Host
from testbed.lab import builder
from testbed.lab import observer as obs
from testbed.vcenter import certs, hostconn
from testbed.vcenter.config import VcenterConfig
from testbed.vcenter.inventory import Inventory

log = logging.getLogger("testbed.vcenter")


def guest_running(status: dict[str, Any]) -> bool:
    """From an agent's ``vm.status``: the QEMU process is up and its guest is running (not paused)."""
    return status.get("state") == "running" and status.get("status") == "running"


@dataclass
class Hold:
    """A relocate held at an engine checkpoint (a breakpoint) until ``release`` is set: by ``continue`` (``by``:
    the user) or by the breakpoint's time limit."""
    checkpoint: str
    release: asyncio.Event = field(default_factory=asyncio.Event)
    by: str | None = None


class VcBase:
    """The state every part shares; the agent pool and VM claims."""

    def __init__(self, cfg: VcenterConfig) -> None:
        self.cfg = cfg
        self.inv = Inventory(cfg.inventory)
        self.secret = cfg.domain_secret.read_bytes()
        self.cert_pem = cfg.cert.read_text()
        self.thumbprint = certs.thumbprint_pem(self.cert_pem)
        self.pubkey = cfg.ssh_key.with_suffix(".pub").read_text().strip()
        self.busy: dict[str, str] = {}                 # VM -> what it is busy with
        self.running: dict[str, asyncio.Task[None]] = {}
        self.held: dict[str, Hold] = {}                # task id -> the breakpoint its move is held at
        self.challenges: dict[str, float] = {}
        self.started_s = time.time()
        self._agents: dict[str, AgentClient] = {}
        self._agent_locks: dict[str, asyncio.Lock] = {}

    @property
    def lab_paths(self) -> builder.LabPaths:
        return builder.LabPaths(self.cfg.lab)

    def managed(self, name: str) -> hostconn.ManagedHost:
        h = self.inv.host(name)
        if h is None:
            raise NotFound(f"host {name!r} is not in vCenter {self.cfg.name}",
                           hint="hosts here: " + (", ".join(x["name"] for x in self.inv.hosts()) or "none"))
        return hostconn.ManagedHost(h["name"], h["address"], self.cfg.ssh_key, self.cfg.known_hosts)

    @contextlib.asynccontextmanager
    async def agent(self, host: str | Host) -> AsyncIterator[AgentClient]:
        """The agent of a managed host (one kept-open connection per host, like vCenter's to vpxa),
        or of any other ``Host`` (a connection for the block)."""
        if not isinstance(host, str):
            once = await host.agent()
            try:
                yield once
            finally:
                await once.close()
            return
        lock = self._agent_locks.setdefault(host, asyncio.Lock())
        async with lock:
            cached = self._agents.get(host)
            if cached is None or cached.closed:
                if cached is not None:
                    await cached.close()
                cached = self._agents[host] = await self.managed(host).agent()
        yield cached

    @contextlib.contextmanager
    def claim(self, vm: str, what: str) -> Any:
        if vm in self.busy:
            raise Conflict(f"VM {vm} is busy: {self.busy[vm]}", hint="wait for that to finish")
        self.busy[vm] = what
        try:
            yield
        finally:
            self.busy.pop(vm, None)

    def vm(self, name: str) -> dict[str, Any]:
        v = self.inv.vm(name)
        if v is None or v["state"] != "registered":
            raise NotFound(f"VM {name!r} is not in vCenter {self.cfg.name}",
                           hint="`testbed vm list` shows the VMs of each vCenter")
        return v

    async def observe_heartbeats(self, name: str, address: str | None) -> None:
        """Bind ``name``'s heartbeats at the lab's observer to ``address`` (the VM's, from this vCenter's pool),
        or unbind them (``None``): a guest that claims another VM's name is then counted, not believed. A lab
        without an observer (or one that does not answer) leaves the VM unbound: logged and recorded."""
        try:
            await obs.set_binding(self.lab_paths.observer_socket, name, address)
        except obs.BINDING_ERRORS as err:
            what = "bound to its address" if address else "unbound"
            log.warning("VM %s: heartbeats not %s at the observer of lab %s: %s", name, what, self.cfg.lab, err)
            self.inv.event("VmHeartbeatBindingFailedEvent", f"VM {name}: heartbeats could not be {what} at the "
                           f"heartbeat observer of lab {self.cfg.lab}: {err}", vm=name)

    def _site_of(self, host: str) -> int:
        h = self.inv.host(host)
        addr = h["address"] if h else ""
        return int(addr.split(".")[2]) if addr.count(".") == 3 else -1

    def _link_bandwidth(self) -> int | None:
        try:
            return builder.load_state(self.cfg.lab).link_bandwidth_bps
        except TestbedError:
            return None
