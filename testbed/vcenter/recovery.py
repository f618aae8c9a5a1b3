"""After a restart: each task that was running is resolved against what the host agents report (the VM
ends on exactly one host, and both inventories agree with it); and the periodic reconcile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from testbed.errors import Conflict, HostUnreachable, NotFound, TestbedError
from testbed.qemu.spec import VmSpec
from testbed.vcenter.base import guest_running
from testbed.vcenter.client import VcClient
from testbed.vcenter.relocate import Relocate
from testbed.vcenter.tasks import Stage, TaskState

log = logging.getLogger("testbed.vcenter")


class Recovery(Relocate):
    """Restart recovery and reconcile."""

    async def recover(self) -> None:
        """Tasks that were running when this vCenter stopped: resolve each against what really runs."""
        for t in self.inv.tasks(state=TaskState.RUNNING):
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
        held = t.pop("held_at", None)
        if isinstance(held, dict):     # the hold ended with the process that held it
            t["notes"].append(f"it was held at breakpoint {held.get('checkpoint')} when vCenter {self.cfg.name} "
                              "stopped")
        v = self.inv.vm(name)
        spec = VmSpec.model_validate(v["spec"]) if v else None
        dest_host = t["placement"]["host"]
        dvc = t.get("destination_vcenter")
        peer = self.peer_client(dvc["url"], dvc["thumbprint"], audience=dvc.get("name")) \
            if dvc and dvc.get("thumbprint") else None
        # 1. let a migration in flight reach an end: the agents carry on without us
        src_status = await self._source_migration_status(src_host, name, wait_s=60)
        if t.get("stage") == Stage.COMMITTED and t.get("commit"):
            # stopped after the commit: the inventories already follow the VM; only the ending is left
            await self._recover_committed(t, name, src_host, src_status)
            if peer is not None:
                peer.close()
            return
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
            if src_status == "VM gone":
                # the engine had removed the source, which it does only after its checks passed (or when the
                # user accepted an unverified move); its report was lost with the restart: "unverified"
                t["notes"].append(f"the source copy of {name} on {src_host} was already removed by the engine")
            else:
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

    async def _recover_committed(self, t: dict[str, Any], name: str, src_host: str, src_status: str) -> None:
        """The move was committed (the inventories follow the VM) but its task did not end: end it with the
        verdict the commit recorded, and record a source copy still on the source host, so nothing is unknown."""
        c = t["commit"]
        dest_host, dest_name, verdict = c["dest_host"], c["dest_vcenter"], c["verdict"]
        t["notes"].append(f"the move had been committed (the VM runs on {dest_host}, vCenter {dest_name}); "
                          "only its ending was left")
        if dest_name != self.cfg.name and self.inv.vm(name) is not None:
            self.inv.delete_vm(name)      # stopped before its row went: the VM is the destination vCenter's now
            t["notes"].append(f"VM {name} removed from this inventory: vCenter {dest_name} holds it")
        if src_status != "VM gone" and self.inv.source_copy(name) is None:
            with contextlib.suppress(NotFound, TestbedError, HostUnreachable):
                async with self.agent(src_host) as agent:
                    await agent.call("migration.finish", name=name)
            self._keep_source_copy(t, name, src_host, VmSpec.model_validate(c["spec"]), dest_host, dest_name,
                                   f"vCenter {self.cfg.name} restarted after the commit, before the source copy "
                                   "was dealt with")
        if verdict == "failed":
            self._finish(t, False, error=TestbedError(
                f"VM {name} moved to {dest_host} ({dest_name}) and runs there, but its integrity check failed",
                hint=f"compare with the source copy on {src_host}, then `testbed vm discard-source {name}`"))
        else:
            self._finish(t, True)

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
                elif peer is None and t.get("stage") in (Stage.MIGRATING, Stage.COMMITTED):
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
        if peer is not None or spec is None or t.get("stage") != Stage.MIGRATING:
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
