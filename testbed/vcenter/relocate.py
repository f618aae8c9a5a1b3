"""The source side of a relocate, as named steps:

1. trust: connect to the destination vCenter pinning its certificate thumbprint (a mismatch stops here,
   before anything moves), log in there, and prove this vCenter's identity over its challenge;
2. prechecks on both sides (``prechecks``), all reported;
3. admission: the destination reserves the VM's name, records a placeholder and grants a ticket to its
   host's agent (``admission``, ``hostconn``);
4. the engine moves the VM; the task shows phase and percent (and ``held_at`` while an administrator's
   breakpoint holds it: ``breakpoints``);
5. commit: the destination registers the VM, the source unregisters it; or abort: the destination removes
   the placeholder. Both keep the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from testbed.errors import Conflict, InputError, NotFound, PrecheckFailed, TestbedError
from testbed.guest.workload import parse_workload
from testbed.hosts.agent import AgentClient
from testbed.hosts.base import Host
from testbed.lab import observer as obs
from testbed.migration.convergence import ConvergenceSettings
from testbed.migration.engine import Migration
from testbed.migration.phases import Phase
from testbed.migration.request import (
    POSTCOPY_RECOVERY_TIMEOUT_S,
    MigrationRequest,
    Place,
    Progress,
    move_time_limit_s,
)
from testbed.qemu.spec import VmSpec
from testbed.vcenter import certs, hostconn, prechecks
from testbed.vcenter.admission import Admission
from testbed.vcenter.base import guest_running
from testbed.vcenter.breakpoints import Breakpoints, hold_limit_s, holds_at_most_s
from testbed.vcenter.client import VcClient
from testbed.vcenter.tasks import Stage
from testbed.vcenter.trust import Trust

log = logging.getLogger("testbed.vcenter")

# How long a source vCenter keeps asking an unreachable destination vCenter to abort an admission.
ABORT_RETRY_S = 1800.0
ABORT_RETRY_FIRST_S = 2.0      # the first wait; it doubles up to 30 s
# Each of the move's own three tries: short, since the background goes on asking (a cut link answers nothing, and
# the client's own limit of 60 s a try kept a relocate's task open 3 min after its rollback).
PEER_ABORT_CALL_S = 10.0

# Where a relocate's percent comes from: each phase owns a slice of 0-100.
_PHASE_PCT = {Phase.CREATED: (0, 0), Phase.PRECHECK: (0, 5), Phase.DISK_SYNC: (5, 45),
              Phase.MEMORY_PRECOPY: (45, 92), Phase.SWITCHOVER: (92, 95), Phase.VERIFY: (95, 98),
              Phase.COMMIT: (98, 99), Phase.DONE: (100, 100), Phase.ROLLBACK: (0, 0),
              Phase.ROLLED_BACK: (100, 100), Phase.FAILED: (100, 100)}


class Relocate(Admission, Trust, Breakpoints):
    """Moves this vCenter runs: within it, or to a peer."""

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
        if options.get("breakpoints"):    # the limit each holds for, as the task shows it
            options = {**options, "breakpoint_timeout_s": hold_limit_s(options)}
        where = f"{host}" + (f" of {dest_vc['url']}" if cross and dest_vc else "")
        t = self.new_task("VirtualMachine.relocate", name, f"relocate VM {name} from {v['host']} to {where}", user,
                          source_host=v["host"], placement=placement, options=options,
                          destination_vcenter={k: dest_vc[k] for k in ("url", "thumbprint") if k in dest_vc}
                          if dest_vc else None, stage=Stage.PRECHECKS.value)
        self.busy[name] = f"relocate task {t['id']}"

        async def work(t: dict[str, Any]) -> None:
            try:
                await self._relocate(t, v, placement, dest_vc, options, user)
            finally:
                self.busy.pop(name, None)
        self.spawn(t, work)
        return t

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
                    "source_task": t["id"], "move_timeout_s": self._move_time_limit(spec, options)}, signed=True)
                t["admission"] = adm["id"]
                t["dest_datastore"] = adm["datastore"]
                self.set_stage(t, Stage.ADMITTED)
                dest: Host = hostconn.TicketHost(adm["ticket"], self.cfg.path / "tickets")
                dest_ds = adm["datastore"]
            else:
                dest = self.managed(dest_host)
                hrow = self.inv.host(dest_host)
                assert hrow is not None
                dest_ds = dest_ds or hrow["facts"]["datastores"][0]["name"]
                t["dest_datastore"] = dest_ds
            # 4. the engine
            self.set_stage(t, Stage.MIGRATING)
            req = self._request(v, spec, src, dest, dest_name, dest_ds or "", options)
            report = await Migration(req, on_progress=self._engine_progress(t),
                                     fault=self.breakpoint_hook(t, options)).run()
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
            if peer is not None and t.get("stage") == Stage.ADMITTED:
                await self._peer_abort(peer, t)
            raise
        finally:
            if peer is not None:
                with contextlib.suppress(TestbedError):
                    await peer.alogout()
                peer.close()

    def _move_time_limit(self, spec: VmSpec, options: dict[str, Any]) -> float:
        """The longest the engine will take for this move with these options: what the destination's ticket lasts.
        A post-copy recovery longer than the engine's default, and every breakpoint's longest hold, add to it."""
        postcopy = bool(options.get("allow_postcopy")) or options.get("converge") == "postcopy"
        recovery = options.get("postcopy_recovery_timeout_s") or POSTCOPY_RECOVERY_TIMEOUT_S
        limit = move_time_limit_s(spec, completion_timeout=options.get("completion_timeout_s"),
                                  rate_bps=options.get("bandwidth_bps") or self._link_bandwidth(),
                                  disk_sync_timeout=options.get("disk_sync_timeout_s"), allow_postcopy=postcopy,
                                  convergence=self._convergence(options))
        if postcopy:
            limit += max(0.0, recovery - POSTCOPY_RECOVERY_TIMEOUT_S)
        return round(limit + holds_at_most_s(options), 1)

    @staticmethod
    def _convergence(options: dict[str, Any]) -> ConvergenceSettings:
        if options.get("sdps_max_stun_pct") is not None:
            return ConvergenceSettings(sdps_max_stun_pct=options["sdps_max_stun_pct"])
        return ConvergenceSettings()

    def _request(self, v: dict[str, Any], spec: VmSpec, src: Host, dest: Host, dest_vc: str, dest_ds: str,
                 options: dict[str, Any]) -> MigrationRequest:
        src_ds = spec.disks[0].datastore if spec.disks else ""
        kw: dict[str, Any] = {}
        for k in ("streams", "bandwidth_bps", "downtime_limit_ms", "completion_timeout_s", "stall_timeout_s",
                  "converge", "allow_postcopy", "accept_unverified", "mirror_mode", "mirror_granularity",
                  "postcopy_recovery_timeout_s", "disk_sync_timeout_s"):
            if options.get(k) is not None:
                kw[k] = options[k]
        # the engine reaches its "switchover:held" checkpoint only when the source waits for it at pre-switchover
        if "switchover:held" in (options.get("breakpoints") or ()):
            kw["hold_switchover"] = True
        return MigrationRequest(
            spec=spec, source=Place(src, self.cfg.name, src_ds), destination=Place(dest, dest_vc, dest_ds),
            observer_socket=self.lab_paths.observer_socket, builtin_guest=bool(v.get("builtin_guest", True)),
            workload=parse_workload(v.get("workload", "idle")), link_bandwidth_bps=self._link_bandwidth(),
            convergence=self._convergence(options), **kw)

    async def _peer_abort(self, peer: VcClient, t: dict[str, Any]) -> tuple[str, list[str]]:
        """Abort the admission at the destination vCenter: ``stopped``, ``running`` (the guest runs there: the
        abort is refused) or ``unknown`` (no answer), and what it undid there."""
        if not t.get("admission"):
            return "stopped", []
        for attempt in range(3):
            try:
                r = await peer.apost(f"/api/testbed/xvmotion/{t['admission']}/abort", {}, signed=True,
                                     timeout_s=PEER_ABORT_CALL_S)
                return "stopped", list(r.get("undone") or [])
            except Conflict:
                return "running", []
            except TestbedError as err:
                log.warning("abort at peer (attempt %d): %s", attempt + 1, err)
                await asyncio.sleep(1)
        t.setdefault("notes", []).append(
            f"the destination vCenter did not confirm the abort: it is asked again in the background for up to "
            f"{ABORT_RETRY_S / 60:.0f} min (a cut link between the sites comes back), so its placeholder, "
            "incoming QEMU and disk do not outlive the move")
        self._abort_later(peer, t)
        return "unknown", []

    def _abort_later(self, peer: VcClient, t: dict[str, Any]) -> None:
        """Ask the destination vCenter to abort admission ``t["admission"]`` until it answers (with backoff, for
        at most ``ABORT_RETRY_S``): what it made for the move goes as soon as it can be reached again. Each try
        is a signed peer call on a client of its own (the move's client is closed by then)."""
        aid, name = t["admission"], t["target"]
        url, thumbprint, audience = peer.url, peer.thumbprint or "", peer.audience
        deadline = time.monotonic() + ABORT_RETRY_S

        async def retry() -> None:
            delay = ABORT_RETRY_FIRST_S
            while time.monotonic() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                client = self.peer_client(url, thumbprint, audience=audience)
                try:
                    r = await client.apost(f"/api/testbed/xvmotion/{aid}/abort", {}, signed=True,
                                           timeout_s=PEER_ABORT_CALL_S)
                    what = f"removed there: {', '.join(r.get('undone') or []) or 'nothing left'}"
                except Conflict:
                    what = "refused: the guest runs there (the move completed at the destination)"
                except TestbedError as err:
                    log.info("abort of admission %s at %s: not yet (%s)", aid, url, err.message.splitlines()[0])
                    continue
                finally:
                    client.close()
                t.setdefault("notes", []).append(f"the destination vCenter confirmed the abort later: {what}")
                self.inv.put_task(t)
                self.inv.event("VmMigrationAbortConfirmedEvent", f"relocate {t['id']} of VM {name}: the abort at "
                               f"{url} was confirmed later; {what}", vm=name, task=t["id"])
                return
            self.inv.event("VmMigrationAbortUnconfirmedEvent", f"relocate {t['id']} of VM {name}: {url} did not "
                           f"answer the abort for {ABORT_RETRY_S / 60:.0f} min; `testbed vcenter reconcile "
                           f"{audience or 'NAME'}` shows what is left there", vm=name, task=t["id"])

        key = f"abort-{aid}"
        task = asyncio.get_running_loop().create_task(retry(), name=key)
        self.running[key] = task     # close() cancels it with the tasks
        task.add_done_callback(lambda _: self.running.pop(key, None))

    async def _commit_move(self, t: dict[str, Any], v: dict[str, Any], spec: VmSpec, dest_host: str, dest_ds: str,
                           peer: VcClient | None, dest_name: str, verdict: str) -> None:
        name = v["name"]
        self._progress(t, "registration", 100)
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
        else:
            v.update(host=dest_host, spec=moved_spec.model_dump(mode="json"), history=history)
            self.inv.put_vm(v)
        # what recovery needs if this vCenter stops before the task ends (the VM row may be gone: cross-vCenter)
        t["commit"] = {"verdict": verdict, "spec": spec.model_dump(mode="json"), "dest_host": dest_host,
                       "dest_vcenter": dest_name}
        self.set_stage(t, Stage.COMMITTED)
        if peer is not None:   # after the stage is written: a restart in between finds the task committed
            self.inv.delete_vm(name)
        self.inv.event("VmMigratedEvent", f"VM {name} moved from {t['source_host']} to "
                       f"{dest_host} ({dest_name}); integrity: {verdict}", vm=name, host=dest_host,
                       task=t["id"], destination_vcenter=dest_name)
