"""The destination side of a cross-vCenter move: prechecks here, a placeholder and an agent ticket (admit),
then commit (the VM is registered here) or abort (what was started here is removed)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from testbed.errors import Conflict, NotFound, TestbedError
from testbed.hostd.tickets import DESTINATION_METHODS, MAX_TTL_S
from testbed.migration.request import move_time_limit_s
from testbed.qemu.spec import VmSpec
from testbed.vcenter import hostconn, prechecks
from testbed.vcenter.base import guest_running
from testbed.vcenter.hosts import Hosts
from testbed.vcenter.vms import Vms

log = logging.getLogger("testbed.vcenter")

# A ticket lasts the move: the source's own time limit for it (``move_timeout_s`` of the admit, from
# testbed.migration.request.move_time_limit_s), else this side's estimate from the VM's spec, plus this margin
# (the source's connect, admission to engine start, a slow rollback), and never more than the agent allows.
TICKET_MARGIN_S = 300.0
TICKET_MIN_TTL_S = 600.0


def ticket_ttl_s(move_timeout_s: float | None, spec: VmSpec) -> float:
    limit = move_timeout_s if move_timeout_s and move_timeout_s > 0 else move_time_limit_s(spec)
    return min(MAX_TTL_S, max(TICKET_MIN_TTL_S, limit + TICKET_MARGIN_S))


class Admission(Hosts, Vms):
    """Moves coming in from a peer vCenter."""

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
        ttl = ticket_ttl_s(body.get("move_timeout_s"), spec)
        try:
            await self._grant_scope(host, aid, spec.moved_to(ds), ttl)
            ticket = await hostconn.agrant_ticket(self.managed(host), aid, ttl)
        except BaseException:
            with contextlib.suppress(TestbedError):
                await self._revoke_ticket(host, aid)
            self.inv.delete_vm(name)
            raise
        self.inv.put_admission({"id": aid, "vm": name, "host": host, "peer": peer, "state": "admitted",
                                "created_s": time.time(), "datastore": ds, "source_task": body.get("source_task")})
        self.inv.event("VmBeingMigratedEvent", f"VM {name} admitted from vCenter {peer} onto {host} ({ds}); "
                       f"placeholder created, agent ticket {aid} granted for {ttl / 60:.0f} min (VM {name} only)",
                       vm=name, host=host, peer=peer)
        return {"id": aid, "ticket": ticket, "datastore": ds}

    async def _grant_scope(self, host: str, aid: str, spec: VmSpec, ttl_s: float) -> None:
        """What the ticket allows, written on the host's agent (over this vCenter's own key) before its key exists:
        the VM, its disks there, the spec its incoming QEMU starts with, a move's destination methods, the expiry."""
        scope = {"id": aid, "vm": spec.name,
                 "disks": [{"datastore": d.datastore, "file": d.file} for d in spec.disks],
                 "spec": spec.model_dump(mode="json"), "methods": sorted(DESTINATION_METHODS),
                 "expires_s": time.time() + ttl_s}
        async with self.agent(host) as agent:
            await agent.call("ticket.grant", scope=scope)

    async def _revoke_ticket(self, host: str, aid: str) -> None:
        """The ticket's key first (no new session), then its scope (an open session can do nothing more)."""
        err: TestbedError | None = None
        try:
            await hostconn.arevoke_ticket(self.managed(host), aid)
        except TestbedError as e:
            err = e
        try:
            async with self.agent(host) as agent:
                await agent.call("ticket.revoke", ticket=aid)
        except TestbedError as e:
            err = err or e
        if err is not None:
            raise err

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
        if v.get("ip"):   # the same address it had at its source vCenter: the observer binds it (again) here
            await self.observe_heartbeats(a["vm"], v["ip"])
        with contextlib.suppress(TestbedError):
            await self._revoke_ticket(a["host"], aid)
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
            await self._revoke_ticket(a["host"], aid)
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
