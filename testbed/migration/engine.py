"""The XvMotion engine: ``Migration`` drives source and destination QEMU through their host agents, phase by
phase (``phases``; one file each: ``disk_sync``, ``precopy``, ``switchover``, ``postcopy``, ``verify``,
``ending``), and returns the report. ``MigrationRequest`` (``request``) says what to move where."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable

from testbed.errors import MigrationError, TestbedError
from testbed.hosts.agent import Agent
from testbed.lab import observer as obs
from testbed.lab import quality
from testbed.migration import clock, integrity
from testbed.migration.disk_sync import DiskSyncPhase
from testbed.migration.ending import Ending
from testbed.migration.phases import Phase
from testbed.migration.precopy import PrecopyPhase
from testbed.migration.report import Endpoint, MigrationReport, PhaseSpan
from testbed.migration.switchover import SwitchoverPhase
from testbed.migration.verify import VerifyPhase


class Migration(PrecopyPhase, DiskSyncPhase, SwitchoverPhase, VerifyPhase, Ending):
    """One migration, start to end. ``run()`` returns the report; it never raises for a failed move."""

    async def run(self) -> MigrationReport:
        """The move; its report says how quiet the machine was while it ran (load, CPU steal: ``quality``)."""
        with quality.Watch() as self.watch:
            return await self._run()

    async def _run(self) -> MigrationReport:
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        req = self.req
        owned = req.agents is None or any(a.closed for a in req.agents)
        conns: list[Agent | BaseException] = (
            list(await asyncio.gather(req.source.host.agent(), req.destination.host.agent(), return_exceptions=True))
            if owned else list(req.agents or ()))
        if any(isinstance(c, BaseException) for c in conns):
            err = next(c for c in conns if isinstance(c, BaseException))
            for c in conns:
                if not isinstance(c, BaseException):
                    await c.close()
            self.machine.enter(Phase.PRECHECK)
            self.machine.enter(Phase.ROLLBACK)
            self.machine.enter(Phase.ROLLED_BACK)
            self.error = f"precheck: cannot reach a host agent: {err}"
            if not isinstance(err, Exception):
                raise err
            return self._report(started)
        src, dst = conns
        assert not isinstance(src, BaseException) and not isinstance(dst, BaseException)
        self.src, self.dst = src, dst
        try:
            async with src.events([self.name]) as sq, dst.events([self.name]) as dq:
                self.sq, self.dq = sq, dq
                await self._measure_clocks()
                await self._phases()
        except asyncio.CancelledError:
            await self._rollback("the migration was interrupted")
            raise
        except Exception as err:  # every failure becomes a rollback and a report, with its cause
            if self.machine.phase is Phase.FAILED:
                self.error = str(err)
            else:
                await self._rollback(f"{self.machine.phase.value}: {err}")
        finally:
            if owned:
                await asyncio.gather(src.close(), dst.close(), return_exceptions=True)
        return self._report(started)

    async def _measure_clocks(self) -> None:
        """Every clock this move reads, as an offset from the engine's (testbed.migration.clock)."""
        assert self.src and self.dst

        def agent_now(a: Agent) -> Callable[[], Awaitable[float]]:
            async def now() -> float:
                return float((await a.call("host.clock"))["monotonic_s"])
            return now

        async def observer_now() -> float:
            return float((await obs.query(self.req.observer_socket, {"op": "vms"}, timeout_s=5))["now_s"])
        for side, agent, place in (("source", self.src, self.req.source),
                                   ("destination", self.dst, self.req.destination)):
            try:
                self.clocks[side] = await clock.measure(agent_now(agent))
            except TestbedError as err:   # an agent older than its clock method: its instants taken as ours
                self.integrity.details.append(f"the agent on {self.where(place)} could not say its clock "
                                              f"({err.message}); its instants are taken as the engine's")
        try:
            self.clocks["observer"] = await clock.measure(observer_now)
        except (OSError, TimeoutError) as err:   # no observer: the guest checks will say so
            self.integrity.details.append(f"the observer's clock could not be read: {err}")

    async def _phases(self) -> None:
        self._enter(Phase.PRECHECK)
        await self._checkpoint("precheck")
        await self._precheck()
        self._enter(Phase.DISK_SYNC)
        wire0 = await self._vmk_tx()
        await self._disk_sync()
        self._enter(Phase.MEMORY_PRECOPY)
        await self._precopy()
        await self._switchover()
        if wire0 is not None and (wire1 := await self._vmk_tx()) is not None:
            self.bytes.wire = wire1 - wire0
        self._enter(Phase.VERIFY)
        await self._verify()
        v = integrity.verdict(self.integrity)
        if v == "failed":
            self._enter(Phase.FAILED)
            await self._keep_source()
            raise MigrationError("integrity check failed after the move: " + "; ".join(self.integrity.details)
                                 + ". The destination keeps running; the source VM and disk were kept "
                                 "(paused) for inspection; nothing was committed.")
        if v == "unverified" and not self.req.accept_unverified:
            self._enter(Phase.UNVERIFIED)
            await self._keep_source()
            why = [d for d in self.integrity.details if "unverified" in d or "cannot tell" in d]
            self.error = ("moved, but not verified: " + "; ".join(why or self.integrity.details)
                          + ". The source copy is kept paused with its disks until it is discarded")
            return
        self.accepted_unverified = v == "unverified"
        self._enter(Phase.COMMIT)
        await self._commit()
        self._enter(Phase.DONE)

    async def _vmk_tx(self) -> int | None:
        assert self.src
        counters = await self.src.call("host.counters")
        return int(counters["vmk1"]["tx_bytes"]) if "vmk1" in counters else None

    async def _precheck(self) -> None:
        assert self.src and self.dst
        req, spec = self.req, self.req.spec
        problems: list[str] = []
        if req.source.host.name == req.destination.host.name:
            problems.append(f"source and destination are the same host ({req.source.host.name})")
        st = await self.src.call("vm.status", name=self.name)
        if st.get("status") != "running":
            problems.append(f"VM {self.name} is not running on {self.where(req.source)} (it is {st.get('status')})")
        facts = await self.dst.call("host.facts")
        if self.name in facts["vms"]:
            problems.append(f"{self.where(req.destination)} already has a VM named {self.name}")
        if spec.machine not in facts["machine_types"]:
            problems.append(f"machine type {spec.machine} is not supported by QEMU {facts['qemu_version']} on "
                            f"{self.where(req.destination)}")
        pgs = {p["name"] for p in facts["port_groups"]}
        for nic in spec.nics:
            if nic.port_group not in pgs:
                problems.append(f"port group {nic.port_group!r} does not exist on {self.where(req.destination)}")
        ds = {d["name"]: d for d in facts["datastores"]}
        need = sum(d.size_bytes for d in spec.disks)
        target = ds.get(req.destination.datastore)
        if target is None:
            problems.append(f"datastore {req.destination.datastore} does not exist on "
                            f"{self.where(req.destination)} (it has: {', '.join(ds)})")
        elif need > target["free_bytes"]:
            problems.append(f"datastore {req.destination.datastore} on {self.where(req.destination)} has "
                            f"{target['free_bytes'] / 2**30:.1f} GiB free; the VM's disks need {need / 2**30:.1f} GiB")
        if problems:
            raise MigrationError("; ".join(problems))

    def _report(self, started: str) -> MigrationReport:
        m, req = self.machine, self.req
        result = {Phase.DONE: "succeeded", Phase.ROLLED_BACK: "rolled_back",
                  Phase.UNVERIFIED: "unverified"}.get(m.phase, "failed")
        end = m.timeline[-1].end_s if m.timeline else 0.0
        return MigrationReport(
            vm=self.name,
            source=Endpoint(vcenter=req.source.vcenter, host=req.source.host.name, datastore=req.source.datastore),
            destination=Endpoint(vcenter=req.destination.vcenter, host=req.destination.host.name,
                                 datastore=req.destination.datastore),
            result=result,  # type: ignore[arg-type]
            phases=[PhaseSpan(name=r.phase.value, start_s=round(r.start_s, 4), end_s=round(r.end_s or r.start_s, 4))
                    for r in m.timeline],
            rounds=self.rounds, downtime_ms=self.downtime, stalls_ms=self.stalls, bytes=self.bytes,
            integrity=self.integrity, streams=req.streams, converge=self.ctl.mode, bandwidth_bps=req.bandwidth_bps,
            link_bandwidth_bps=req.link_bandwidth_bps, total_s=round(end or 0.0, 3),
            failed_phase=(m.failed_in.value if m.failed_in
                          else m.timeline[-2].phase.value if m.phase is Phase.FAILED else None),
            error=self.error, rollback=self.rollback_log, switchover=self.switch, started_at=started,
            allow_postcopy=req.allow_postcopy, completion_timeout_s=round(self.timeout_s, 1),
            decisions=self.decisions, postcopy=self.postcopy, source_kept=self.source_kept,
            clocks={k: c.as_dict() for k, c in self.clocks.items()}, machine=self.watch.summary(),
            accepted_unverified=self.accepted_unverified)
