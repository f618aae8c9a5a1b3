"""A vCenter's operations: SSO, hosts, VMs, relocate (within and across vCenters), admission, reconcile.

The API (``api``) is a thin layer over this class; everything it does is
recorded in the inventory (``inventory``) with an event. Long operations are
tasks: a row in the inventory updated as they go, so a restarted vCenter
finds them (``recover``) and resolves them against what the host agents
report: the VM ends on exactly one host, and both inventories agree with it.

A cross-vCenter relocate, as the source vCenter runs it:
1. trust: connect to the destination vCenter pinning its certificate thumbprint
   (a mismatch stops here, before anything moves), log in with the
   destination's credentials, and prove this vCenter's identity with a
   signature over the destination's challenge; both sides record the trust;
2. prechecks on both sides (``prechecks``), all reported;
3. admission: the destination reserves the VM's name and records a
   placeholder, and grants a ticket to its host's agent (``hostconn``);
4. the engine moves the VM; the task shows phase and percent;
5. commit: the destination registers the VM, the source unregisters it; or
   abort: the destination removes the placeholder. Both keep the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from testbed.errors import (
    Conflict,
    Forbidden,
    HostError,
    HostUnreachable,
    InputError,
    NotFound,
    PrecheckFailed,
    TestbedError,
    Unauthorized,
)
from testbed.guest.workload import parse_workload
from testbed.hosts.agent import AgentClient, remove_vm
from testbed.hosts.base import Host
from testbed.lab import builder
from testbed.lab import observer as obs
from testbed.lab import topology as topo
from testbed.migration.engine import Migration, MigrationRequest, Place, Progress
from testbed.migration.phases import Phase
from testbed.qemu.spec import VmSpec
from testbed.vcenter import certs, hostconn, prechecks, sso
from testbed.vcenter.client import VcClient
from testbed.vcenter.config import VcenterConfig
from testbed.vcenter.inventory import Inventory
from testbed.vms import build_vm_spec, check_vm_request, realize_on_host

log = logging.getLogger("testbed.vcenter")

ADMIN = "administrator"
PEER_CLOCK_SKEW_S = 300
TICKET_TTL_S = 3 * 3600
# Where a relocate's percent comes from: each phase owns a slice of 0-100.
_PHASE_PCT = {Phase.CREATED: (0, 0), Phase.PRECHECK: (0, 5), Phase.DISK_SYNC: (5, 45),
              Phase.MEMORY_PRECOPY: (45, 92), Phase.SWITCHOVER: (92, 95), Phase.VERIFY: (95, 98),
              Phase.COMMIT: (98, 99), Phase.DONE: (100, 100), Phase.ROLLBACK: (0, 0),
              Phase.ROLLED_BACK: (100, 100), Phase.FAILED: (100, 100)}


def guest_running(status: dict[str, Any]) -> bool:
    """From an agent's ``vm.status``: the QEMU process is up and its guest is running (not paused)."""
    return status.get("state") == "running" and status.get("status") == "running"


def _mac(seed: str) -> str:
    h = hashlib.sha256(seed.encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


def task_verdict(t: dict[str, Any]) -> str | None:
    """A relocate's outcome in one word: verified | unverified | failed | rolled_back (None: not a finished move).

    ``unverified``: the VM runs on the destination and its source copy is kept (the task SUCCEEDED).
    """
    if t.get("verdict"):
        return str(t["verdict"])
    r = t.get("result") or {}
    if not isinstance(r, dict) or "integrity" not in r:
        return None
    return {"succeeded": "unverified" if r.get("accepted_unverified") else "verified"}.get(r["result"], r["result"])


class VCenter:
    def __init__(self, cfg: VcenterConfig) -> None:
        self.cfg = cfg
        self.inv = Inventory(cfg.inventory)
        self.secret = cfg.domain_secret.read_bytes()
        self.cert_pem = cfg.cert.read_text()
        self.thumbprint = certs.thumbprint_pem(self.cert_pem)
        self.pubkey = cfg.ssh_key.with_suffix(".pub").read_text().strip()
        self.busy: dict[str, str] = {}                 # VM -> what it is busy with
        self.running: dict[str, asyncio.Task[None]] = {}
        self.challenges: dict[str, float] = {}
        self.started_s = time.time()
        self._agents: dict[str, AgentClient] = {}
        self._agent_locks: dict[str, asyncio.Lock] = {}

    @property
    def lab_paths(self) -> builder.LabPaths:
        return builder.LabPaths(self.cfg.lab)

    # --- SSO --------------------------------------------------------------------------------
    def _qualify(self, user: str) -> str:
        return user if "@" in user else f"{user}@{self.cfg.sso_domain}"

    def login(self, user: str, password: str) -> str:
        user = self._qualify(user)
        domain = user.split("@", 1)[1]
        if domain != self.cfg.sso_domain:
            raise Unauthorized(f"user {user} is not in SSO domain {self.cfg.sso_domain} of vCenter {self.cfg.name}",
                               hint=f"log in as a user of {self.cfg.sso_domain}")
        row = self.inv.user(user)
        if row is None or not sso.check_password(password, row["password_hash"]):
            self.inv.event("UserLoginFailedEvent", f"failed login for {user}")
            raise Unauthorized(f"wrong user name or password for vCenter {self.cfg.name} ({self.cfg.sso_domain})",
                               hint="the lab keeps the administrator's password in "
                                    f"{self.cfg.path / 'administrator.password'}")
        token, _ = sso.issue(self.secret, user, self.cfg.sso_domain, self.cfg.session_ttl_s)
        self.inv.event("UserLoginSessionEvent", f"{user} logged in")
        return token

    def authenticate(self, token: str | None) -> sso.Session:
        if not token:
            raise Unauthorized("this request needs a session: send the vmware-api-session-id header",
                               hint="create a session with POST /api/session (basic auth)")
        try:
            s = sso.verify(self.secret, self.cfg.sso_domain, token)
        except sso.TokenError as err:
            raise Unauthorized(f"vCenter {self.cfg.name}: {err}",
                               hint="create a new session with POST /api/session") from err
        if self.inv.revoked(s.sid):
            raise Unauthorized(f"vCenter {self.cfg.name}: this session was logged out",
                               hint="create a new session with POST /api/session")
        return s

    def logout(self, s: sso.Session) -> None:
        self.inv.revoke(s.sid, s.expires_s)
        self.inv.event("UserLogoutSessionEvent", f"{s.user} logged out")

    # --- peers and trust -----------------------------------------------------------------------
    def challenge(self) -> str:
        nonce = secrets.token_hex(16)
        now = time.time()
        self.challenges = {k: v for k, v in self.challenges.items() if v > now}
        self.challenges[nonce] = now + 60
        return nonce

    def accept_trust(self, s: sso.Session, name: str, url: str, cert_pem: str, nonce: str, signature: bytes) -> None:
        """A peer vCenter asks to be trusted: an administrator of this domain vouches (their session),
        and the peer proves it holds the key of the certificate it presents (signature over our nonce)."""
        if self.inv.user(s.user) is None or self.inv.user(s.user)["role"] != "Admin":  # type: ignore[index]
            raise Forbidden(f"{s.user} may not configure trust on vCenter {self.cfg.name}")
        if self.challenges.pop(nonce, 0) < time.time():
            raise Forbidden("the trust challenge is unknown or expired; ask for a new one")
        if not certs.verify(cert_pem, f"{nonce}|{name}".encode(), signature):
            raise Forbidden(f"vCenter {name} did not prove it holds the key of the certificate it presented")
        if name == self.cfg.name:
            raise InputError(f"vCenter {name} cannot trust itself")
        self.inv.put_trust(name, url, certs.thumbprint_pem(cert_pem), cert_pem, how=f"vouched by {s.user}")
        self.inv.event("TrustAddedEvent", f"vCenter {name} ({url}) is now trusted, vouched by {s.user}",
                       peer=name, thumbprint=certs.thumbprint_pem(cert_pem))

    def verify_peer(self, name: str | None, ts: str | None, sig_b64: str | None, method: str, path: str,
                    body: bytes) -> str:
        import base64

        from testbed.vcenter.client import signing_message
        if not name or not ts or not sig_b64:
            raise Forbidden(f"vCenter {self.cfg.name} only accepts this from a trusted peer vCenter "
                            "(signed request headers missing)")
        trust = self.inv.trust(name)
        if trust is None:
            raise Forbidden(f"vCenter {self.cfg.name} does not trust vCenter {name!r}; refusing",
                            hint="a relocate from it establishes the trust with an administrator's login here")
        try:
            skew = abs(time.time() - float(ts))
            sig = base64.b64decode(sig_b64)
        except ValueError as err:
            raise Forbidden("malformed peer signature headers") from err
        if skew > PEER_CLOCK_SKEW_S:
            raise Forbidden(f"peer request from {name} is {skew:.0f} s off this vCenter's clock")
        if not certs.verify(trust["cert_pem"], signing_message(method, path, ts, body), sig):
            raise Forbidden(f"the request claims to come from vCenter {name} but its signature does not verify")
        return name

    def peer_client(self, url: str, thumbprint: str, token: str | None = None) -> VcClient:
        return VcClient(url, thumbprint=thumbprint, token=token, peer=(self.cfg.name, self.cfg.key))

    async def establish_trust(self, peer: VcClient) -> dict[str, Any]:
        """Source side: prove who we are to ``peer`` (logged in), and record it as trusted here."""
        about = await peer.aget("/api/testbed/about")
        nonce = await peer.apost("/api/testbed/trust/challenge")
        import base64
        sig = base64.b64encode(certs.sign(self.cfg.key, f"{nonce}|{self.cfg.name}".encode())).decode()
        await peer.apost("/api/testbed/trust", {
            "name": self.cfg.name, "url": self.cfg.url, "certificate": self.cert_pem, "nonce": nonce,
            "signature": sig})
        if about["certificate"] and certs.thumbprint_pem(about["certificate"]) != peer.thumbprint:
            raise Forbidden(f"vCenter at {peer.url} reports a certificate that is not the one it presented")
        self.inv.put_trust(about["name"], peer.url, str(peer.thumbprint), about["certificate"],
                           how="pinned thumbprint at relocate")
        return dict(about)

    def about(self) -> dict[str, Any]:
        return {"name": self.cfg.name, "fqdn": self.cfg.fqdn, "url": self.cfg.url,
                "sso_domain": self.cfg.sso_domain, "thumbprint": self.thumbprint, "certificate": self.cert_pem,
                "datacenter": self.cfg.datacenter, "version": "testbed-vcenter 1", "started_s": self.started_s}

    # --- hosts -------------------------------------------------------------------------------
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

    # --- VMs ---------------------------------------------------------------------------------
    def vm(self, name: str) -> dict[str, Any]:
        v = self.inv.vm(name)
        if v is None or v["state"] != "registered":
            raise NotFound(f"VM {name!r} is not in vCenter {self.cfg.name}",
                           hint="`testbed vm list` shows the VMs of each vCenter")
        return v

    @contextlib.contextmanager
    def claim(self, vm: str, what: str) -> Any:
        if vm in self.busy:
            raise Conflict(f"VM {vm} is busy: {self.busy[vm]}", hint="wait for that to finish")
        self.busy[vm] = what
        try:
            yield
        finally:
            self.busy.pop(vm, None)

    def _next_ip(self) -> str:
        used = {v.get("ip") for v in self.inv.vms()}
        base = self.cfg.site_index * self.cfg.vm_ip_pool
        for i in range(self.cfg.vm_ip_pool):
            ip = topo.vm_address(base + i)
            if ip not in used:
                return ip
        raise Conflict(f"vCenter {self.cfg.name} has no VM address left in its pool of {self.cfg.vm_ip_pool}")

    async def create_vm(self, name: str, host: str, memory_bytes: int, disk_bytes: int | None, *,
                        datastore: str | None = None, network: str | None = None, workload: str = "idle",
                        vcpus: int = 1, start: bool = True, encrypted: bool = False,
                        kernel: str | None = None, initrd: str | None = None, append: str | None = None,
                        image: str | None = None, user: str = "") -> dict[str, Any]:
        """A VM of the built-in guest, or the user's own: ``kernel``/``initrd``/``append`` or a bootable
        ``image`` (copied to the datastore), paths as the host sees them."""
        check_vm_request(name, memory_bytes)
        h = self.inv.host(host)
        if h is None:
            self.managed(host)
            raise AssertionError
        dss = [d["name"] for d in h["facts"].get("datastores", [])]
        ds = datastore or (dss[0] if dss else "")
        if ds not in dss:
            raise NotFound(f"datastore {ds!r} is not on host {host}", hint="datastores there: " + ", ".join(dss))
        pgs = [p["name"] for p in h["facts"].get("port_groups", [])]
        pg = network or (pgs[0] if pgs else "")
        if pg not in pgs:
            raise NotFound(f"network {pg!r} is not on host {host}", hint="networks there: " + ", ".join(pgs))
        if self.inv.vm(name) is not None:
            raise Conflict(f"VM {name!r} already exists in vCenter {self.cfg.name}",
                           hint="choose another name or delete the old VM")
        with self.claim(name, "being created"):
            ip = self._next_ip()
            spec, wl, builtin = build_vm_spec(
                name, ip=ip, mac=_mac(f"{self.cfg.lab}/{self.cfg.name}/{name}"), memory_bytes=memory_bytes,
                disk_bytes=disk_bytes, workload=workload, datastore=ds, port_group=pg, vcpus=vcpus,
                encrypted=encrypted, kernel=kernel, initrd=initrd, append=append, image=image)
            row = {"name": name, "host": host, "state": "registered", "spec": spec.model_dump(mode="json"),
                   "ip": ip, "workload": wl.describe(), "builtin_guest": builtin, "created_s": time.time(),
                   "history": [{"host": host, "vcenter": self.cfg.name, "since_s": time.time()}]}
            self.inv.put_vm(row)
            try:
                async with self.agent(host) as agent:
                    spec = await realize_on_host(agent, spec, image=image, start=start)
            except BaseException:
                await self._remove_from_host(host, spec)
                self.inv.delete_vm(name)
                raise
            row["spec"] = spec.model_dump(mode="json")
            self.inv.put_vm(row)
        self.inv.event("VmCreatedEvent", f"VM {name} created on {host} ({memory_bytes // 2**20} MiB, "
                       f"workload {wl.describe()}) by {user or 'system'}", vm=name, host=host)
        return await self.vm_info(name)

    async def _remove_from_host(self, host: str | Host, spec: VmSpec, *, strict: bool = False) -> list[str]:
        """Stop and remove ``spec``'s VM and disks from ``host``: what was done, in words. What could not be done
        is logged and listed too ("... failed: ..."), or, with ``strict``, raised as a ``HostError``."""
        where = host if isinstance(host, str) else host.name
        try:
            async with self.agent(host) as agent:
                done, failed = await remove_vm(agent, spec)
        except (HostUnreachable, TestbedError, TimeoutError) as err:
            done, failed = [], [f"host {where}: {str(err).splitlines()[0] or 'no answer in time'}"]
        if failed:
            log.warning("removing VM %s from %s: %s", spec.name, where, "; ".join(failed))
            if strict:
                raise HostError(f"VM {spec.name} could not be removed from host {where}: {'; '.join(failed)}",
                                hint="see the host's agent log; the inventory is unchanged, so try again")
        return done + [f"failed: {f}" for f in failed]

    async def vm_info(self, name: str, live: bool = True) -> dict[str, Any]:
        v = self.vm(name)
        spec = VmSpec.model_validate(v["spec"])
        power = "UNKNOWN"
        if live:
            try:
                async with self.agent(v["host"]) as agent:
                    st = await agent.call("vm.status", name=name)
                up = st.get("state") == "running"
                power = "POWERED_OFF" if not up else \
                    "POWERED_ON" if st.get("status", "running") == "running" else f"POWERED_ON ({st['status']})"
            except NotFound:
                power = "POWERED_OFF"
            except (HostUnreachable, TestbedError, TimeoutError):
                power = "UNKNOWN (host not responding)"
        return {"vm": name, "name": name, "host": v["host"], "power_state": power,
                "memory_size_MiB": spec.memory_bytes // 2**20, "cpu_count": spec.vcpus, "ip": v.get("ip"),
                "workload": v.get("workload"), "guest": "builtin" if v.get("builtin_guest") else "user",
                "disks": [{"datastore": d.datastore, "file": d.file, "capacity": d.size_bytes,
                           "encrypted": d.encrypted} for d in spec.disks],
                "nics": [{"network": n.port_group, "mac_address": n.mac} for n in spec.nics],
                "machine": spec.machine, "cpu_model": spec.cpu_model, "history": v.get("history", []),
                "busy": self.busy.get(name)}

    async def console_log(self, name: str) -> dict[str, Any]:
        v = self.vm(name)
        async with self.agent(v["host"]) as agent:
            text = (await agent.call("vm.console_log", name=name))["text"]
        return {"vm": name, "host": v["host"], "text": text}

    async def list_vms(self) -> list[dict[str, Any]]:
        vms = [v for v in self.inv.vms() if v["state"] == "registered"]
        live: dict[str, dict[str, Any]] = {}
        down: set[str] = set()

        async def ask(host: str) -> None:
            try:
                async with self.agent(host) as agent:
                    for d in await agent.call("vm.list"):
                        live[d["name"]] = d
            except (HostUnreachable, TestbedError, TimeoutError):
                down.add(host)
        await asyncio.gather(*(ask(h) for h in {v["host"] for v in vms}))
        out = []
        for v in vms:
            spec = VmSpec.model_validate(v["spec"])
            d = live.get(v["name"])
            if v["host"] in down:
                power = "UNKNOWN"
            elif d is None or d["state"] == "exited":
                power = "POWERED_OFF"
            else:
                power = "POWERED_ON" if d.get("status", "running") == "running" else f"POWERED_ON ({d['status']})"
            out.append({"vm": v["name"], "name": v["name"], "host": v["host"], "power_state": power,
                        "memory_size_MiB": spec.memory_bytes // 2**20, "ip": v.get("ip"),
                        "workload": v.get("workload"), "busy": self.busy.get(v["name"])})
        return out

    async def power(self, name: str, action: str, user: str = "") -> dict[str, Any]:
        v = self.vm(name)
        spec = VmSpec.model_validate(v["spec"])
        with self.claim(name, f"power {action}"):
            async with self.agent(v["host"]) as agent:
                if action == "start":
                    await agent.call("vm.start", spec=spec.model_dump())
                elif action == "stop":
                    await agent.call("vm.stop", name=name)
                else:
                    raise InputError(f"power action {action!r} is not one of: start, stop")
        self.inv.event("VmPoweredOnEvent" if action == "start" else "VmPoweredOffEvent",
                       f"VM {name} powered {'on' if action == 'start' else 'off'} on {v['host']} by {user or 'system'}",
                       vm=name, host=v["host"])
        return await self.vm_info(name)

    async def delete_vm(self, name: str, user: str = "") -> None:
        v = self.vm(name)
        with self.claim(name, "being deleted"):
            await self._remove_from_host(v["host"], VmSpec.model_validate(v["spec"]))
            self.inv.delete_vm(name)
        if self.inv.source_copy(name) is not None:   # the VM goes, and with it what its last move kept
            await self.discard_source(name, user)
        self.inv.event("VmRemovedEvent", f"VM {name} deleted from {v['host']} by {user or 'system'}",
                       vm=name, host=v["host"])

    # --- tasks --------------------------------------------------------------------------------
    def new_task(self, kind: str, target: str, description: str, user: str, **data: Any) -> dict[str, Any]:
        t = {"id": f"task-{secrets.token_hex(5)}", "kind": kind, "target": target, "state": "RUNNING",
             "started_s": time.time(), "ended_s": None, "description": description, "user": user,
             "progress": {"phase": "queued", "percent": 0}, "prechecks": [], "result": None, "error": None,
             "vcenter": self.cfg.name, **data}
        self.inv.put_task(t)
        self.inv.event("TaskCreatedEvent", f"{description} ({t['id']})", vm=target, task=t["id"])
        return t

    def task(self, tid: str) -> dict[str, Any]:
        t = self.inv.task(tid)
        if t is None:
            raise NotFound(f"task {tid!r} is not in vCenter {self.cfg.name}",
                           hint="`testbed task list` shows the recent tasks")
        return t

    def task_view(self, t: dict[str, Any]) -> dict[str, Any]:
        return {"id": t["id"], "operation": t["kind"], "target": t["target"],
                "status": "SUCCEEDED" if t["state"] == "SUCCEEDED" else t["state"],
                "description": t["description"], "user": t.get("user"), "vcenter": self.cfg.name,
                "start_time": t["started_s"], "end_time": t["ended_s"], "progress": t.get("progress"),
                "prechecks": t.get("prechecks", []), "result": t.get("result"), "error": t.get("error"),
                "notes": t.get("notes", []), "verdict": task_verdict(t)}

    def _finish(self, t: dict[str, Any], ok: bool, *, error: TestbedError | str | None = None,
                result: Any = None) -> None:
        t["state"] = "SUCCEEDED" if ok else "FAILED"
        t["ended_s"] = time.time()
        if result is not None:
            t["result"] = result
        if error is not None:
            t["error"] = {"message": str(error.args[0] if isinstance(error, TestbedError) else error),
                          "hint": error.hint if isinstance(error, TestbedError) else None,
                          "kind": type(error).__name__ if isinstance(error, TestbedError) else "InternalError"}
            if isinstance(error, PrecheckFailed):
                t["error"]["failed_checks"] = [c["name"] for c in error.checks]
        t["progress"] = {**t.get("progress", {}), "percent": 100}
        self.inv.put_task(t)
        self.inv.event("TaskCompletedEvent" if ok else "TaskFailedEvent",
                       f"{t['description']}: {'succeeded' if ok else 'failed: ' + t['error']['message']}",
                       vm=t["target"], task=t["id"])

    def spawn(self, t: dict[str, Any], work: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        async def run() -> None:
            try:
                await work(t)
            except TestbedError as err:
                self._finish(t, False, error=err)
            except Exception as err:  # a bug: still end the task, with the cause
                log.exception("task %s", t["id"])
                self._finish(t, False, error=f"internal error: {type(err).__name__}: {err}")
            finally:
                self.running.pop(t["id"], None)
        self.running[t["id"]] = asyncio.get_running_loop().create_task(run())

    # --- relocate ------------------------------------------------------------------------------
    def start_relocate(self, name: str, placement: dict[str, Any], dest_vc: dict[str, Any] | None,
                       options: dict[str, Any], user: str) -> dict[str, Any]:
        v = self.vm(name)
        if name in self.busy:
            raise Conflict(f"VM {name} is busy: {self.busy[name]}", hint="wait for that to finish")
        if (kept := self.inv.source_copy(name)) is not None:
            raise Conflict(f"VM {name}: the source copy of its last move is still kept on {kept['host']} "
                           f"({kept['why']})", hint=f"decide about it first: `testbed vm discard-source {name}`")
        host = placement.get("host")
        if not host:
            raise InputError("relocate needs placement.host (the destination host)")
        cross = dest_vc is not None
        if not cross:
            self.managed(host)
            if host == v["host"]:
                raise InputError(f"VM {name} already runs on {host}")
        else:
            assert dest_vc is not None
            missing = [k for k in ("url",) if not dest_vc.get(k)]
            if missing:
                raise InputError("destination_vcenter needs: " + ", ".join(missing))
            dest_vc = {**dest_vc}
            if dest_vc.get("thumbprint"):
                dest_vc["thumbprint"] = certs.normalize(dest_vc["thumbprint"])
        where = f"{host}" + (f" of {dest_vc['url']}" if cross and dest_vc else "")
        t = self.new_task("VirtualMachine.relocate", name, f"relocate VM {name} from {v['host']} to {where}", user,
                          source_host=v["host"], placement=placement, options=options,
                          destination_vcenter={k: dest_vc[k] for k in ("url", "thumbprint") if k in dest_vc}
                          if dest_vc else None, stage="prechecks")
        self.busy[name] = f"relocate task {t['id']}"

        async def work(t: dict[str, Any]) -> None:
            try:
                await self._relocate(t, v, placement, dest_vc, options, user)
            finally:
                self.busy.pop(name, None)
        self.spawn(t, work)
        return t

    def _progress(self, t: dict[str, Any], phase: str, percent: float, **detail: Any) -> None:
        t["progress"] = {"phase": phase, "percent": round(percent, 1), **detail}
        now = time.monotonic()
        if phase != t.get("_last_phase") or now - t.get("_last_write", 0) > 0.5:
            t["_last_phase"], t["_last_write"] = phase, now
            self.inv.put_task(t)

    def _engine_progress(self, t: dict[str, Any]) -> Callable[[Progress], None]:
        def on(p: Progress) -> None:
            lo, hi = _PHASE_PCT.get(p.phase, (0, 0))
            frac = 0.0
            if p.phase is Phase.DISK_SYNC and p.disk_pct is not None:
                frac = p.disk_pct / 100
            elif p.phase is Phase.MEMORY_PRECOPY and p.transferred_bytes + p.remaining_bytes > 0:
                frac = p.transferred_bytes / (p.transferred_bytes + p.remaining_bytes)
            self._progress(t, p.phase.value, lo + (hi - lo) * frac, round=p.round,
                           dirty_rate_bps=round(p.dirty_rate_bps), send_rate_bps=round(p.send_rate_bps),
                           throttle_pct=p.throttle_pct, remaining_bytes=p.remaining_bytes)
        return on

    def _vm_facts(self, v: dict[str, Any], network: str | None) -> dict[str, Any]:
        spec = VmSpec.model_validate(v["spec"])
        pgs = [network or n.port_group for n in spec.nics]
        return {"name": v["name"], "machine": spec.machine, "cpu_model": spec.cpu_model, "port_groups": pgs,
                "disk_bytes": sum(d.size_bytes for d in spec.disks), "memory_bytes": spec.memory_bytes}

    async def _source_checks(self, v: dict[str, Any], agent: AgentClient,
                             cross: bool) -> tuple[list[prechecks.Check], float | None]:
        out: list[prechecks.Check] = []
        spec = VmSpec.model_validate(v["spec"])
        name = v["name"]
        try:
            st = await agent.call("vm.status", name=name)
            running = guest_running(st)
        except NotFound:
            running, st = False, {"status": "not on the host"}
        if not running:
            out.append(prechecks.Check("vm-state", "error", f"VM {name} is {st.get('status')} on {v['host']}",
                                       f"power the VM on first (`testbed vm start {name}`)"))
        elif v.get("builtin_guest", True) and not await self._heartbeat_fresh(name):
            out.append(prechecks.Check("vm-state", "error",
                                       f"VM {name} runs on {v['host']} but its guest agent sent no heartbeat in the "
                                       "last 2 s (still booting?): the move could not be verified",
                                       "wait until `testbed vm list` shows a live heartbeat, then retry"))
        else:
            out.append(prechecks.Check("vm-state", "ok", f"VM {name} is running on {v['host']}"))
        h = self.inv.host(v["host"])
        assert h is not None
        out.append(prechecks.license_check(v["host"], h["license"], vcenter=self.cfg.name, cross=cross))
        encrypted = []
        for d in spec.disks:
            with contextlib.suppress(NotFound):
                info = await agent.call("disk.info", datastore=d.datastore, file=d.file)
                if info.get("encrypted"):
                    encrypted.append(d.file)
        if encrypted:
            out.append(prechecks.Check("encryption", "error",
                                       f"VM {name} has encrypted disk(s) {', '.join(encrypted)}: cross-vCenter "
                                       "vMotion does not move encrypted VMs",
                                       "decrypt the VM's disks first, or move it another way (cold migration)"))
        else:
            out.append(prechecks.Check("encryption", "ok", f"VM {name} has no encrypted disks"))
        t0 = time.monotonic()
        dirty = await self._dirty_rate(agent, name) if running else None
        log.info("dirty rate of %s: %s B/s (%.2f s)", name, dirty, time.monotonic() - t0)
        return out, dirty

    async def _heartbeat_fresh(self, name: str, window_s: float = 2.0) -> bool:
        try:
            st = await obs.query(self.lab_paths.observer_socket, {"op": "stats", "vm": name,
                                                                  "since_s": time.monotonic() - window_s})
        except (OSError, TimeoutError, RuntimeError):
            return False
        return bool(st.get("count"))

    async def _dirty_rate(self, agent: AgentClient, name: str) -> float | None:
        """QEMU's own estimate (``calc-dirty-rate``, page sampling over 1 s), in bytes per second."""
        try:
            await agent.call("vm.qmp", name=name, command="calc-dirty-rate",
                             arguments={"calc-time": 1, "mode": "page-sampling"})
            for _ in range(40):
                await asyncio.sleep(0.1 if _ else 1.0)
                r = await agent.call("vm.qmp", name=name, command="query-dirty-rate")
                if r.get("status") == "measured":
                    return float(r.get("dirty-rate", 0)) * 2**20
        except TestbedError as err:
            log.warning("dirty rate of %s: %s", name, err)
        return None

    def destination_checks(self, vm: dict[str, Any], source_facts: dict[str, Any], host: str,
                           datastore: str, moving_within: bool = False) -> list[prechecks.Check]:
        h = self.inv.host(host)
        if h is None:
            return [prechecks.Check("host-compatibility", "error", f"host {host!r} is not in vCenter {self.cfg.name}",
                                    "hosts there: " + ", ".join(x["name"] for x in self.inv.hosts()))]
        registered = {x["name"] for x in self.inv.vms()}
        if moving_within:
            registered.discard(vm["name"])
        out = prechecks.destination(vm, source_facts, h, datastore, registered, cross=not moving_within,
                                    vcenter=self.cfg.name)
        if (kept := self.inv.source_copy(vm["name"])) is not None:
            out.append(prechecks.Check(
                "source-copy", "error", f"vCenter {self.cfg.name} still keeps the source copy of VM {vm['name']!r} "
                f"on {kept['host']} from an earlier move that was not verified",
                f"`testbed vm discard-source {vm['name']} --vcenter {self.cfg.name}` once you have decided"))
        return out

    async def incoming_precheck(self, vm: dict[str, Any], source_facts: dict[str, Any], host: str,
                                datastore: str, source_names: list[str],
                                moving_within: bool = False) -> dict[str, Any]:
        """Destination side: check our host, resolve the source's names, open the vMotion test ports."""
        t0 = time.monotonic()
        if self.inv.host(host) is not None:
            await self.refresh_host(host)
            if not datastore:
                h = self.inv.host(host)
                dss = h["facts"].get("datastores", []) if h else []
                datastore = dss[0]["name"] if dss else ""
        checks = self.destination_checks(vm, source_facts, host, datastore, moving_within)
        checks.append(prechecks.resolve(source_names, f"vCenter {self.cfg.name}"))
        probe: dict[str, Any] | None = None
        if self.inv.host(host) is not None:
            try:
                async with self.agent(host) as agent:
                    probe = await agent.call("net.probe_listen", count=2, open_s=30)
            except TestbedError as err:
                checks.append(prechecks.Check("vmotion-network", "error",
                                              f"host {host} could not open vMotion test ports: {err}"))
        h = self.inv.host(host)
        log.info("incoming precheck of %s for %s took %.2f s", vm.get("name"), host, time.monotonic() - t0)
        return {"checks": [c.as_dict() for c in checks], "probe": probe, "datastore": datastore,
                "host_hostname": h["facts"].get("hostname", host) if h else host}

    async def _relocate(self, t: dict[str, Any], v: dict[str, Any], placement: dict[str, Any],
                        dest_vc: dict[str, Any] | None, options: dict[str, Any], user: str) -> None:
        name, src_host = v["name"], v["host"]
        dest_host, network = placement["host"], placement.get("network")
        peer: VcClient | None = None
        dest_name = self.cfg.name
        try:
            # 1. trust
            if dest_vc is not None:
                self._progress(t, "trust", 1)
                peer, about = await self._connect_peer(dest_vc, user)
                dest_name = about["name"]
                t["destination_vcenter"] = {"url": peer.url, "thumbprint": peer.thumbprint, "name": dest_name}
                self.inv.put_task(t)
            # 2. prechecks, both sides
            self._progress(t, "prechecks", 2)
            src = self.managed(src_host)
            async with self.agent(src) as agent:
                source_facts = await agent.call("host.facts")
                vmf = self._vm_facts(v, network)
                src_names = [self.inv.host(src_host)["facts"].get("hostname", src_host)]  # type: ignore[index]
                dest_ds = placement.get("datastore")
                if peer is not None:
                    theirs_job = peer.apost("/api/testbed/xvmotion/precheck", {
                        "vm": vmf, "source_facts": source_facts, "host": dest_host, "datastore": dest_ds,
                        "source_names": src_names}, signed=True)
                else:
                    theirs_job = self.incoming_precheck(vmf, source_facts, dest_host, dest_ds or "", src_names,
                                                        moving_within=True)
                # both sides at once: the dirty-rate sample takes a second
                (src_checks, dirty), theirs = await asyncio.gather(
                    self._source_checks(v, agent, cross=peer is not None), theirs_job)
                checks = [*src_checks, *(prechecks.Check(**c) for c in theirs["checks"])]
                probe = theirs.get("probe")
                if probe:
                    res = await agent.call("net.probe_connect", address=probe["address"], ports=probe["ports"],
                                           connect_timeout_s=3.0)
                    checks.append(prechecks.vmotion(res, src_host, dest_host, probe["address"]))
                names = [theirs.get("host_hostname", dest_host)]
                if peer is not None:
                    names.append(urllib.parse.urlsplit(peer.url).hostname or "")
                checks.append(prechecks.resolve(names, f"vCenter {self.cfg.name}"))
                cross_site = peer is not None or self._site_of(dest_host) != self._site_of(src_host)
                link = self._link_bandwidth() if cross_site else None
                checks.append(prechecks.bandwidth(vmf["memory_bytes"], vmf["disk_bytes"], dirty, link))
            t["prechecks"] = prechecks.merge(checks)
            self.inv.put_task(t)
            bad = prechecks.failed(t["prechecks"])
            if bad:
                raise PrecheckFailed(f"prechecks failed for relocating VM {name} to {dest_host}: "
                                     + "; ".join(f"[{c['name']}] {c['message']}" for c in bad), checks=bad,
                                     hint=" / ".join(c["hint"] for c in bad if c.get("hint")) or None)
            # 3. admission at the destination
            self._progress(t, "admission", 4)
            spec = VmSpec.model_validate(v["spec"])
            if network:
                spec = spec.model_copy(update={"nics": tuple(n.model_copy(update={"port_group": network})
                                                             for n in spec.nics)})
            if peer is not None:
                adm = await peer.apost("/api/testbed/xvmotion/admit", {
                    "vm": {**{k: v[k] for k in ("name", "ip", "workload", "builtin_guest", "history") if k in v},
                           "spec": spec.model_dump(mode="json")},
                    "host": dest_host, "datastore": dest_ds, "source_vcenter": self.cfg.name,
                    "source_task": t["id"]}, signed=True)
                t["admission"] = adm["id"]
                t["dest_datastore"] = adm["datastore"]
                t["stage"] = "admitted"
                self.inv.put_task(t)
                dest: Host = hostconn.TicketHost(adm["ticket"], self.cfg.path / "tickets")
                dest_ds = adm["datastore"]
            else:
                dest = self.managed(dest_host)
                hrow = self.inv.host(dest_host)
                assert hrow is not None
                dest_ds = dest_ds or hrow["facts"]["datastores"][0]["name"]
                t["dest_datastore"] = dest_ds
            # 4. the engine
            t["stage"] = "migrating"
            self.inv.put_task(t)
            req = self._request(v, spec, src, dest, dest_name, dest_ds or "", options)
            report = await Migration(req, on_progress=self._engine_progress(t)).run()
            if isinstance(dest, hostconn.TicketHost):
                dest.discard()
            t["result"] = report.model_dump(mode="json")
            # 5. commit or abort (the verdict rule: testbed.migration.integrity.verdict)
            if report.result == "succeeded":
                await self._commit_move(t, v, spec, dest_host, dest_ds or "", peer, dest_name,
                                        "accepted unverified" if report.accepted_unverified else "verified")
                self._finish(t, True)
            elif report.result == "unverified":
                # The VM runs on the destination (the inventory follows it); a check could not be made, so the
                # source copy stays, paused, until the user decides: discard-source, or inspect and delete.
                await self._commit_move(t, v, spec, dest_host, dest_ds or "", peer, dest_name, "unverified")
                self._keep_source_copy(t, name, src_host, spec, dest_host, dest_name, report.error or "")
                self._finish(t, True)
            elif report.result == "failed":
                # The engine found a problem after the switchover: the VM runs on the destination (that is
                # where the inventory must say it is) and the source copy was kept, paused, for inspection.
                await self._commit_move(t, v, spec, dest_host, dest_ds or "", peer, dest_name, "failed")
                if report.source_kept:
                    self._keep_source_copy(t, name, src_host, spec, dest_host, dest_name, report.error or "")
                raise TestbedError(
                    f"VM {name} moved to {dest_host} ({dest_name}) and runs there, but {report.error}",
                    hint=f"the source copy of {name} is kept paused on {src_host} for inspection; compare, "
                         f"then `testbed vm discard-source {name}` removes it; the inventory follows the running VM")
            else:
                if peer is not None:
                    await self._peer_abort(peer, t)
                self.inv.event("VmFailedMigrateEvent", f"relocate of VM {name} to {dest_host} ({dest_name}) failed "
                               f"in {report.failed_phase}: {report.error}; it runs on {src_host}",
                               vm=name, host=src_host, task=t["id"])
                raise TestbedError(f"relocate of VM {name} failed in phase {report.failed_phase}: {report.error}",
                                   hint=f"the VM keeps running on {src_host}; rollback: "
                                        + ("; ".join(report.rollback) or "nothing to undo"))
        except Exception:
            # admitted but the engine never started: the destination's placeholder and ticket must go
            if peer is not None and t.get("stage") == "admitted":
                await self._peer_abort(peer, t)
            raise
        finally:
            if peer is not None:
                with contextlib.suppress(TestbedError):
                    await peer.alogout()
                peer.close()

    def _site_of(self, host: str) -> int:
        h = self.inv.host(host)
        addr = h["address"] if h else ""
        return int(addr.split(".")[2]) if addr.count(".") == 3 else -1

    def _link_bandwidth(self) -> int | None:
        try:
            return builder.load_state(self.cfg.lab).link_bandwidth_bps
        except TestbedError:
            return None

    def _request(self, v: dict[str, Any], spec: VmSpec, src: Host, dest: Host, dest_vc: str, dest_ds: str,
                 options: dict[str, Any]) -> MigrationRequest:
        src_ds = spec.disks[0].datastore if spec.disks else ""
        kw: dict[str, Any] = {}
        for k in ("streams", "bandwidth_bps", "downtime_limit_ms", "completion_timeout_s", "stall_timeout_s",
                  "converge", "allow_postcopy", "accept_unverified"):
            if options.get(k) is not None:
                kw[k] = options[k]
        return MigrationRequest(
            spec=spec, source=Place(src, self.cfg.name, src_ds), destination=Place(dest, dest_vc, dest_ds),
            observer_socket=self.lab_paths.observer_socket, builtin_guest=bool(v.get("builtin_guest", True)),
            workload=parse_workload(v.get("workload", "idle")), link_bandwidth_bps=self._link_bandwidth(), **kw)

    async def _connect_peer(self, dest_vc: dict[str, Any], user: str) -> tuple[VcClient, dict[str, Any]]:
        url = dest_vc["url"]
        thumbprint = dest_vc.get("thumbprint")
        trusted = next((tr for tr in self.inv.trusts() if tr["url"].rstrip("/") == url.rstrip("/")), None)
        if thumbprint is None:
            if trusted is None:
                raise InputError(f"no thumbprint given for {url}, and this vCenter has no trust with it",
                                 hint="pass --dest-thumbprint (`testbed vcenter show NAME` prints it)")
            thumbprint = trusted["thumbprint"]
        peer = self.peer_client(url, thumbprint)
        try:
            if dest_vc.get("user_name"):
                await peer.alogin(dest_vc["user_name"], dest_vc.get("password", ""))
            else:
                # enhanced linked mode: the same SSO domain, so this vCenter's session is valid there
                token, _ = sso.issue(self.secret, user, self.cfg.sso_domain, 600)
                peer.token = token
            about = await self.establish_trust(peer) if trusted is None or dest_vc.get("user_name") else \
                await peer.aget("/api/testbed/about")
        except BaseException:
            peer.close()
            raise
        return peer, about

    async def _peer_abort(self, peer: VcClient, t: dict[str, Any]) -> tuple[str, list[str]]:
        """Abort the admission at the destination vCenter: ``stopped``, ``running`` (the guest runs there: the
        abort is refused) or ``unknown`` (no answer), and what it undid there."""
        if not t.get("admission"):
            return "stopped", []
        for attempt in range(3):
            try:
                r = await peer.apost(f"/api/testbed/xvmotion/{t['admission']}/abort", {},
                                            signed=True)
                return "stopped", list(r.get("undone") or [])
            except Conflict:
                return "running", []
            except TestbedError as err:
                log.warning("abort at peer (attempt %d): %s", attempt + 1, err)
                await asyncio.sleep(1)
        t.setdefault("notes", []).append("the destination vCenter did not confirm the abort; its reconcile "
                                         "will find the placeholder")
        return "unknown", []

    def _keep_source_copy(self, t: dict[str, Any], name: str, host: str, spec: VmSpec, dest_host: str,
                          dest_name: str, why: str) -> None:
        """Record the paused source QEMU and disks a move left on ``host``, for ``discard_source``."""
        self.inv.put_source_copy({"vm": name, "host": host, "task": t["id"], "kept_s": time.time(),
                                  "spec": spec.model_dump(mode="json"), "moved_to": dest_host,
                                  "destination_vcenter": dest_name, "why": why})
        t.setdefault("notes", []).append(
            f"the source copy of {name} (paused QEMU and its disks) is kept on {host}: {why}. "
            f"`testbed vm discard-source {name}` removes it once you have decided")
        self.inv.put_task(t)
        self.inv.event("VmSourceCopyKeptEvent", f"source copy of VM {name} kept on {host} after its move to "
                       f"{dest_host} ({dest_name}): {why}", vm=name, host=host, task=t["id"])

    async def discard_source(self, name: str, user: str = "") -> dict[str, Any]:
        """Remove the source copy a move kept (the user decided): its QEMU, run directory and disks."""
        c = self.inv.source_copy(name)
        if c is None:
            raise NotFound(f"vCenter {self.cfg.name} keeps no source copy of VM {name!r}",
                           hint="only a move that was not verified, or failed after the switchover, keeps one; "
                                "`testbed vm source-copies` lists them")
        spec = VmSpec.model_validate(c["spec"])
        with self.claim(f"source copy of {name}", "being discarded"):
            async with self.agent(c["host"]) as agent:
                try:
                    st = await agent.call("vm.status", name=name)
                except NotFound:
                    st = {}
                row = self.inv.vm(name)
                if guest_running(st) and row is not None and row["host"] == c["host"]:
                    raise Conflict(f"VM {name} runs on {c['host']} again: that is the VM, not a kept copy",
                                   hint="nothing to discard; the inventory says it runs there")
                if guest_running(st):
                    raise Conflict(f"the source copy of VM {name} on {c['host']} is running, not paused: someone "
                                   "resumed it; discarding it would stop a running guest",
                                   hint=f"stop it first (on the host), or delete the VM {name} where it runs now")
                with contextlib.suppress(NotFound, TestbedError):
                    await agent.call("migration.finish", name=name)
            done = await self._remove_from_host(c["host"], spec, strict=True)
            self.inv.delete_source_copy(name)
        self.inv.event("VmSourceCopyDiscardedEvent", f"source copy of VM {name} on {c['host']} discarded by "
                       f"{user or 'system'}: {', '.join(done) or 'nothing was left there'}", vm=name, host=c["host"],
                       task=c["task"])
        return {"vm": name, "host": c["host"], "removed": done}

    async def _commit_move(self, t: dict[str, Any], v: dict[str, Any], spec: VmSpec, dest_host: str, dest_ds: str,
                           peer: VcClient | None, dest_name: str, verdict: str) -> None:
        name = v["name"]
        moved_spec = spec.moved_to(dest_ds)
        history = [*v.get("history", []), {"host": dest_host, "vcenter": dest_name, "since_s": time.time()}]
        if peer is not None:
            err: TestbedError | None = None
            for _ in range(5):
                try:
                    await peer.apost(f"/api/testbed/xvmotion/{t['admission']}/commit",
                                            {"spec": moved_spec.model_dump(mode="json"), "history": history,
                                             "verdict": verdict}, signed=True)
                    err = None
                    break
                except TestbedError as e:
                    err = e
                    await asyncio.sleep(1)
            if err is not None:
                t.setdefault("notes", []).append(
                    f"VM {name} runs on {dest_host} but vCenter {dest_name} did not confirm the registration "
                    f"({err}); run `testbed vcenter reconcile {dest_name}`")
            self.inv.delete_vm(name)
        else:
            v.update(host=dest_host, spec=moved_spec.model_dump(mode="json"), history=history)
            self.inv.put_vm(v)
        t["stage"] = "committed"
        self.inv.put_task(t)
        self.inv.event("VmMigratedEvent", f"VM {name} moved from {t['source_host']} to "
                       f"{dest_host} ({dest_name}); integrity: {verdict}", vm=name, host=dest_host,
                       task=t["id"], destination_vcenter=dest_name)

    # --- the destination side of a cross-vCenter move ---------------------------------------------
    async def admit(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        vm, host, ds = body["vm"], body["host"], body.get("datastore")
        name = vm["name"]
        spec = VmSpec.model_validate(vm["spec"])
        h = self.inv.host(host)
        if h is None:
            self.managed(host)
            raise AssertionError
        dss = [d["name"] for d in h["facts"].get("datastores", [])]
        ds = ds or dss[0]
        if ds not in dss:
            raise NotFound(f"datastore {ds!r} is not on host {host}", hint="datastores there: " + ", ".join(dss))
        if self.inv.vm(name) is not None:
            raise Conflict(f"a VM named {name} is already in vCenter {self.cfg.name}")
        aid = hostconn.new_ticket_id()
        placeholder = {"name": name, "host": host, "state": "incoming",
                       "spec": spec.moved_to(ds).model_dump(mode="json"),
                       "ip": vm.get("ip"), "workload": vm.get("workload", "idle"),
                       "builtin_guest": vm.get("builtin_guest", True), "created_s": time.time(),
                       "history": vm.get("history", []), "admission": aid, "from_vcenter": peer}
        self.inv.put_vm(placeholder)
        try:
            ticket = await hostconn.agrant_ticket(self.managed(host), aid, TICKET_TTL_S)
        except BaseException:
            self.inv.delete_vm(name)
            raise
        self.inv.put_admission({"id": aid, "vm": name, "host": host, "peer": peer, "state": "admitted",
                                "created_s": time.time(), "datastore": ds, "source_task": body.get("source_task")})
        self.inv.event("VmBeingMigratedEvent", f"VM {name} admitted from vCenter {peer} onto {host} ({ds}); "
                       f"placeholder created, agent ticket {aid} granted", vm=name, host=host, peer=peer)
        return {"id": aid, "ticket": ticket, "datastore": ds}

    def _admission(self, aid: str, peer: str) -> dict[str, Any]:
        a = self.inv.admission(aid)
        if a is None or a["peer"] != peer:
            raise NotFound(f"vCenter {self.cfg.name} has no admission {aid} from {peer}")
        return a

    async def commit_incoming(self, peer: str, aid: str, body: dict[str, Any]) -> dict[str, Any]:
        a = self._admission(aid, peer)
        if a["state"] == "committed":
            return {"state": "committed"}
        v = self.inv.vm(a["vm"])
        assert v is not None
        v.update(state="registered", spec=body.get("spec", v["spec"]), history=body.get("history", v["history"]))
        v.pop("admission", None)
        self.inv.put_vm(v)
        a["state"] = "committed"
        self.inv.put_admission(a)
        with contextlib.suppress(TestbedError):
            await hostconn.arevoke_ticket(self.managed(a["host"]), aid)
        self.inv.event("VmMigratedEvent", f"VM {a['vm']} arrived from vCenter {peer} on {a['host']} and is "
                       f"registered here (integrity: {body.get('verdict', 'not said')})", vm=a["vm"], host=a["host"])
        return {"state": "committed"}

    async def abort_incoming(self, peer: str, aid: str) -> dict[str, Any]:
        a = self._admission(aid, peer)
        if a["state"] in ("aborted", "committed"):
            return {"state": a["state"]}
        v = self.inv.vm(a["vm"])
        done: list[str] = []
        if v is not None and v["state"] == "incoming":
            async with self.agent(a["host"]) as agent:
                try:   # refused (Conflict) once the guest runs there; after it, it never will
                    done = (await agent.call("migration.abort_incoming", name=a["vm"]))["undone"]
                except NotFound:
                    pass
                except Conflict as err:
                    raise Conflict(f"VM {a['vm']} is running on {a['host']}: it cannot be aborted there",
                                   hint="the move completed; commit it instead") from err
                with contextlib.suppress(NotFound, TestbedError):
                    await agent.call("migration.finish", name=a["vm"])
            done += await self._remove_from_host(a["host"], VmSpec.model_validate(v["spec"]))
            self.inv.delete_vm(a["vm"])
        a["state"] = "aborted"
        self.inv.put_admission(a)
        with contextlib.suppress(TestbedError):
            await hostconn.arevoke_ticket(self.managed(a["host"]), aid)
        self.inv.event("VmMigrationAbortedEvent", f"incoming VM {a['vm']} from {peer} aborted; removed from "
                       f"{a['host']}: {', '.join(done) or 'nothing there'}", vm=a["vm"], host=a["host"])
        return {"state": "aborted", "undone": done}

    async def admission_status(self, peer: str, aid: str) -> dict[str, Any]:
        a = self._admission(aid, peer)
        st: dict[str, Any] = {}
        with contextlib.suppress(NotFound):
            async with self.agent(a["host"]) as agent:
                st = await agent.call("vm.status", name=a["vm"])
        return {"id": aid, "state": a["state"], "vm": a["vm"], "host": a["host"],
                "running": guest_running(st), "status": st.get("status")}

    # --- restart recovery and reconcile ----------------------------------------------------------
    async def recover(self) -> None:
        """Tasks that were running when this vCenter stopped: resolve each against what really runs."""
        for t in self.inv.tasks(state="RUNNING"):
            if t["id"] in self.running:
                continue
            self.busy[t["target"]] = f"recovering task {t['id']}"

            async def work(t: dict[str, Any]) -> None:
                try:
                    await self._recover_relocate(t)
                finally:
                    self.busy.pop(t["target"], None)
            self.spawn(t, work)

    async def _recover_relocate(self, t: dict[str, Any]) -> None:
        name, src_host = t["target"], t["source_host"]
        t.setdefault("notes", []).append(f"vCenter {self.cfg.name} restarted during this task; resolving it "
                                         "from what the hosts report")
        v = self.inv.vm(name)
        spec = VmSpec.model_validate(v["spec"]) if v else None
        dest_host = t["placement"]["host"]
        dvc = t.get("destination_vcenter")
        peer = self.peer_client(dvc["url"], dvc["thumbprint"]) if dvc and dvc.get("thumbprint") else None
        # 1. let a migration in flight reach an end: the agents carry on without us
        src_status = await self._source_migration_status(src_host, name, wait_s=60)
        # 2. where does the VM run now? A source that completed has handed the guest over: the destination's
        #    agent resumes it by itself once it has loaded the device state, which can take seconds
        dest_running = await self._destination_running(t, peer, dest_host, name,
                                                       settle_s=60 if src_status == "completed" else 0)
        dest_state, dest_undone = ("running", []) if dest_running else \
            await self._stop_destination(t, peer, dest_host, spec)
        if dest_state == "running" and v is not None and spec is not None:
            # the move completed: the inventory follows the VM; the source copy stays (see below)
            dest_name = dvc["name"] if dvc else self.cfg.name
            dest_ds = t.get("dest_datastore") or t["placement"].get("datastore") or \
                (spec.disks[0].datastore if spec.disks else "")
            # The engine's checks never ran: the move is unverified, so the source copy stays (paused).
            with contextlib.suppress(NotFound, TestbedError, HostUnreachable):
                async with self.agent(src_host) as agent:
                    await agent.call("migration.finish", name=name)
            await self._commit_move(t, v, spec, dest_host, dest_ds, peer, dest_name, "unverified")
            why = (f"vCenter {self.cfg.name} restarted during the move, after the switchover: the engine's "
                   "integrity checks did not run")
            self._keep_source_copy(t, name, src_host, spec, dest_host, dest_name, why)
            t["notes"].append(f"the VM had switched over to {dest_host} and runs there; the inventory follows it")
            t["verdict"] = "unverified"
            self._finish(t, True)
        else:
            # it did not switch over (or its destination is stopped now): roll back to the source, which is
            # resumed after a completed migration only once the destination is known to be stopped
            undone: list[str] = list(dest_undone)
            completed = False
            with contextlib.suppress(NotFound, TestbedError):
                async with self.agent(src_host) as agent:
                    r = await agent.call("migration.cancel", name=name, resume_completed=dest_state == "stopped")
                    undone += r.get("undone", [])
                    completed = bool(r.get("completed"))
                    await agent.call("migration.finish", name=name)
            if completed and dest_state != "stopped":
                self._finish(t, False, error=TestbedError(
                    f"vCenter {self.cfg.name} restarted during the relocate of VM {name}; the source's migration "
                    f"had completed but the destination {dest_host} could not be reached to stop it, so the VM "
                    f"stays paused on {src_host} rather than risk two running copies",
                    hint=f"check {dest_host}; `testbed vcenter reconcile {self.cfg.name}` reports what runs where"))
            else:
                self._finish(t, False, error=TestbedError(
                    f"vCenter {self.cfg.name} restarted during the relocate of VM {name} before the switchover "
                    f"(source migration state: {src_status}); the move was rolled back and the VM runs on "
                    f"{src_host}", hint="start the relocate again"))
            t["notes"].append("rolled back: " + (", ".join(undone) or "nothing to undo on the source"))
            self.inv.put_task(t)
        if peer is not None:
            peer.close()

    async def _destination_running(self, t: dict[str, Any], peer: VcClient | None, dest_host: str, name: str,
                                   settle_s: float) -> bool:
        """Whether the guest runs on the destination, waiting up to ``settle_s`` for it to start there."""
        deadline = time.monotonic() + settle_s
        while True:
            alive = False
            with contextlib.suppress(NotFound, TestbedError, HostUnreachable, TimeoutError):
                if peer is not None and t.get("admission"):
                    st = await peer.aget(f"/api/testbed/xvmotion/{t['admission']}", signed=True)
                    if st["running"]:
                        return True
                    alive = st.get("status") is not None
                elif peer is None and t.get("stage") in ("migrating", "committed"):
                    async with self.agent(dest_host) as agent:
                        st = await agent.call("vm.status", name=name)
                    if guest_running(st):
                        return True
                    alive = st.get("state") == "running"
            if not alive or time.monotonic() > deadline:   # no QEMU there: it will not start
                return False
            await asyncio.sleep(0.5)

    async def _stop_destination(self, t: dict[str, Any], peer: VcClient | None, dest_host: str,
                                spec: VmSpec | None) -> tuple[str, list[str]]:
        """Stop the destination's copy before the source resumes: ``stopped``, ``running`` (it runs there: the
        move completed) or ``unknown`` (not reachable), and what was undone there."""
        if peer is not None and t.get("admission"):
            return await self._peer_abort(peer, t)
        if peer is not None or spec is None or t.get("stage") != "migrating":
            return "stopped", []       # no destination was started by this task
        undone: list[str] = []
        try:
            async with self.agent(dest_host) as agent:
                undone += (await agent.call("migration.abort_incoming", name=spec.name))["undone"]
                with contextlib.suppress(NotFound, TestbedError):
                    await agent.call("migration.finish", name=spec.name)
        except NotFound:
            pass
        except Conflict:
            return "running", []
        except (TestbedError, HostUnreachable, TimeoutError) as err:
            t.setdefault("notes", []).append(f"the destination {dest_host} could not be stopped: {err}")
            return "unknown", []
        moved = spec.moved_to(t["placement"].get("datastore"))
        return "stopped", undone + await self._remove_from_host(dest_host, moved)

    async def _source_migration_status(self, host: str, name: str, wait_s: float) -> str:
        deadline = time.monotonic() + wait_s
        status = "none"
        while True:
            try:
                async with self.agent(host) as agent:
                    info = await agent.call("vm.qmp", name=name, command="query-migrate")
                status = info.get("status", "none")
            except NotFound:
                return "VM gone"
            except TestbedError as err:
                return f"unknown ({err})"
            if status not in ("active", "setup", "device", "pre-switchover", "postcopy-active",
                              "cancelling", "wait-unplug") or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.5)

    async def reconcile(self) -> dict[str, Any]:
        """Compare the inventory with what every host's agent reports; fix what is certain, report the rest."""
        running: dict[str, list[str]] = {}
        unreachable: list[str] = []
        for h in self.inv.hosts():
            try:
                async with self.agent(h["name"]) as agent:
                    for d in await agent.call("vm.list"):
                        if d.get("state") == "running":
                            running.setdefault(d["name"], []).append(h["name"])
            except (HostUnreachable, TestbedError, TimeoutError, OSError) as err:
                unreachable.append(f"{h['name']}: {err}")
        fixed, problems, agree, skipped = [], [], [], []
        kept = []
        for c in self.inv.source_copies():   # a paused source copy an unverified move kept: known, not a stray
            if c["host"] in running.get(c["vm"], []):
                running[c["vm"]].remove(c["host"])
                if not running[c["vm"]]:
                    del running[c["vm"]]
            kept.append(f"VM {c['vm']}: source copy kept on {c['host']} (task {c['task']}); "
                        f"`testbed vm discard-source {c['vm']}` removes it")
        for v in self.inv.vms():
            where = running.pop(v["name"], [])
            if v["name"] in self.busy:
                skipped.append(f"{v['name']} ({self.busy[v['name']]})")
                continue
            if v["state"] == "incoming":
                problems.append(f"VM {v['name']}: placeholder of an incoming move from {v.get('from_vcenter')} "
                                f"(admission {v.get('admission')}); running on: {', '.join(where) or 'no host'}")
                continue
            if len(where) > 1:
                problems.append(f"VM {v['name']} runs on several hosts: {', '.join(where)}")
            elif where and where[0] != v["host"]:
                fixed.append(f"VM {v['name']} runs on {where[0]}, not {v['host']}: inventory updated")
                v["host"] = where[0]
                self.inv.put_vm(v)
            elif where:
                agree.append(v["name"])
            else:
                agree.append(v["name"])   # registered and powered off: nothing contradicts it
        for name, hosts in running.items():
            problems.append(f"VM {name} runs on {', '.join(hosts)} but is not in this vCenter's inventory")
        report = {"vcenter": self.cfg.name, "agree": agree, "fixed": fixed, "problems": problems,
                  "source_copies": kept,
                  "unreachable_hosts": unreachable, "skipped_busy": skipped, "time": time.time()}
        self.inv.event("ReconcileEvent", f"reconcile: {len(agree)} agree, {len(fixed)} fixed, "
                       f"{len(problems)} problems, {len(unreachable)} hosts unreachable", report=report)
        return report

    async def reconcile_forever(self) -> None:
        """Every ``reconcile_every_s``: the inventory checked against the hosts (quietly, when all agree)."""
        while self.cfg.reconcile_every_s > 0:
            await asyncio.sleep(self.cfg.reconcile_every_s)
            try:
                r = await self.reconcile()
                if r["problems"] or r["fixed"]:
                    log.warning("reconcile: fixed %s; problems %s", r["fixed"], r["problems"])
            except Exception:  # never let the loop die; the next round tries again
                log.exception("reconcile")

    async def close(self) -> None:
        for task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*self.running.values(), return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self._agents.values()), return_exceptions=True)
        self.inv.close()
