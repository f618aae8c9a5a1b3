"""The XvMotion engine: drive source and destination QEMU through their host agents (phases: ``phases``).

DISK_SYNC: the destination's empty disks exported over NBD on its vMotion address, ``blockdev-mirror``
(write-blocking, or background with a throttle) from the source until every job has copied its disk, within a
deadline. MEMORY_PRECOPY: ``migrate`` (multifd streams), every round recorded, the convergence controller
(``convergence``: auto-converge, SDPS, downtime steps, post-copy) deciding. SWITCHOVER: the agents switch over
on their own (``testbed.hostd.migration``); the engine watches, on one clock (``clock``). VERIFY
(``integrity``): the guest's own checks, disk digests at one instant, the outage in sequence numbers. Then the
verdict rule: COMMIT only when memory and every disk are verified; FAILED or UNVERIFIED keep the source copy,
paused. Before the switchover a failure is a ROLLBACK: the destination is stopped first, then the source
resumes: never two running copies, never none.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import Conflict, MigrationError, NotFound, TestbedError
from testbed.guest.workload import Workload
from testbed.hosts.agent import AgentClient, remove_vm
from testbed.hosts.base import Host
from testbed.lab import observer as obs
from testbed.lab import quality
from testbed.migration import clock, integrity
from testbed.migration.convergence import (
    Action,
    Controller,
    ConvergeMode,
    ConvergenceSettings,
    RoundStats,
    completion_timeout_s,
)
from testbed.migration.phases import Phase, PhaseMachine
from testbed.migration.report import (
    Bytes,
    Decision,
    Downtime,
    Endpoint,
    Integrity,
    MigrationReport,
    PhaseSpan,
    Postcopy,
    Round,
    Stalls,
    Switchover,
)
from testbed.qemu.spec import VmSpec

PAGE = 4096
ROLLBACK_CALL_S = 30.0     # a rollback waits this long for each call to an agent that may be out of reach
DISK_SYNC_MIN_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Place:
    host: Host
    vcenter: str
    datastore: str


@dataclass
class Progress:
    """What the live display shows."""

    phase: Phase
    disk_pct: float | None = None
    round: int = 0
    dirty_rate_bps: float = 0.0
    send_rate_bps: float = 0.0
    throttle_pct: int = 0
    remaining_bytes: int = 0
    transferred_bytes: int = 0
    stun_pct: float = 0.0
    postcopy: bool = False


@dataclass(frozen=True)
class MigrationRequest:
    spec: VmSpec
    source: Place
    destination: Place
    observer_socket: Path
    builtin_guest: bool = True
    workload: Workload = field(default_factory=Workload)
    streams: int = 1
    converge: ConvergeMode = "adaptive"   # see testbed.migration.convergence; "auto" = "auto-converge"
    bandwidth_bps: int | None = None
    link_bandwidth_bps: int | None = None
    downtime_limit_ms: int = 100
    max_throttle_pct: int = 90             # auto-converge ceiling: 90% = at most ~90 ms vCPU sleeps
    stall_timeout_s: float = 20.0          # no migration progress for this long: fail
    completion_timeout_s: float | None = None    # pre-copy that does not converge: fall back or roll back
    #                                          (None: per GiB of RAM, ConvergenceSettings)
    hold_switchover: bool = False          # the source waits for the engine at pre-switchover
    # write-blocking: every guest write waits for the destination (a round trip at distance);
    # background-throttled: writes complete locally, throttled while the mirror's backlog grows
    mirror_mode: str = "write-blocking"     # | "background-throttled"
    mirror_granularity: int | None = None   # QEMU's default (the image's cluster size) unless set
    # the disk copy must reach READY (every block there, the guest's writes mirrored) within this, or the move
    # rolls back; None: three times the disks' size at the link's rate, at least DISK_SYNC_MIN_TIMEOUT_S
    disk_sync_timeout_s: float | None = None
    allow_postcopy: bool = False           # adaptive: post-copy as the last resort
    convergence: ConvergenceSettings = field(default_factory=ConvergenceSettings)
    postcopy_recovery_timeout_s: float = 120.0   # a post-copy whose channel broke: reconnect within this
    accept_unverified: bool = False        # commit (remove the source copy) although a check could not be made
    # Open connections to the source's and destination's agents that the caller keeps (a management plane
    # holds its host connections, as a vCenter does); None: the engine connects to both and closes them.
    agents: tuple[AgentClient, AgentClient] | None = None


# Fault injection and experiments: called at named checkpoints, e.g. to kill a QEMU or cut the link there.
# Checkpoints: "precheck", "disk-sync:mirror-started", "memory-precopy:started",
# "switchover:held" (only with hold_switchover), "postcopy:running" (the destination runs the guest,
# pages still on the source), "verify".
FaultHook = Callable[[str, "Migration"], Awaitable[None]]


class Migration:
    """One migration, start to end. ``run()`` returns the report; it never raises for a failed move."""

    def __init__(self, req: MigrationRequest, *, on_progress: Callable[[Progress], None] | None = None,
                 fault: FaultHook | None = None) -> None:
        self.req = req
        self.name = req.spec.name
        self.machine = PhaseMachine()
        self.on_progress = on_progress or (lambda p: None)
        self.fault = fault
        self.src: AgentClient | None = None
        self.dst: AgentClient | None = None
        self.dest_spec = req.spec.moved_to(req.destination.datastore)
        self.created_disks: list[tuple[str, str]] = []
        self.dest_started = False
        self.source_touched = False
        self.rounds: list[Round] = []
        self.hb_before: dict[str, Any] | None = None   # last heartbeat before the switchover
        self.frozen_s: float | None = None   # the source QEMU's stop to the start of cont on the destination
        self.switch = Switchover()
        self.mono: dict[str, float] = {}
        self.bytes = Bytes()
        self.downtime = Downtime(reported=None, observed=None)
        self.stalls = Stalls()
        self.integrity = Integrity()
        self.incoming: dict[str, Any] = {}
        self.clocks: dict[str, clock.Offset] = {"source": clock.Offset(), "destination": clock.Offset(),
                                                "observer": clock.Offset()}
        self.source_kept = False            # FAILED/UNVERIFIED: the source QEMU and disks are still there
        self.accepted_unverified = False
        self.rollback_log: list[str] = []
        self.error: str | None = None
        self.progress = Progress(Phase.CREATED)
        self.timeout_s = req.completion_timeout_s or completion_timeout_s(req.spec.memory_bytes, req.convergence)
        self.ctl = Controller(req.converge, req.convergence, req.downtime_limit_ms, req.allow_postcopy,
                              req.max_throttle_pct, self.timeout_s)
        self.decisions: list[Decision] = []
        self.postcopy: Postcopy | None = None

    # --- helpers ------------------------------------------------------------------------
    def _enter(self, phase: Phase, at: float | None = None) -> None:
        self.machine.enter(phase, at)
        self.progress.phase = phase
        self.on_progress(self.progress)

    async def _checkpoint(self, name: str) -> None:
        if self.fault is not None:
            await self.fault(name, self)

    def where(self, place: Place) -> str:
        return f"host {place.host.name} ({place.vcenter})"

    # --- the run --------------------------------------------------------------------------
    async def run(self) -> MigrationReport:
        """The move; its report says how quiet the machine was while it ran (load, CPU steal: ``quality``)."""
        with quality.Watch() as self.watch:
            return await self._run()

    async def _run(self) -> MigrationReport:
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        req = self.req
        owned = req.agents is None or any(a.closed for a in req.agents)
        conns: list[AgentClient | BaseException] = (
            list(await asyncio.gather(req.source.host.agent(), req.destination.host.agent(), return_exceptions=True))
            if owned else list(req.agents or ()))
        if any(isinstance(c, BaseException) for c in conns):
            err = next(c for c in conns if isinstance(c, BaseException))
            for c in conns:
                if isinstance(c, AgentClient):
                    await c.close()
            self.machine.enter(Phase.PRECHECK)
            self.machine.enter(Phase.ROLLBACK)
            self.machine.enter(Phase.ROLLED_BACK)
            self.error = f"precheck: cannot reach a host agent: {err}"
            if not isinstance(err, Exception):
                raise err
            return self._report(started)
        src, dst = conns
        assert isinstance(src, AgentClient) and isinstance(dst, AgentClient)
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

        def agent_now(a: AgentClient) -> Callable[[], Awaitable[float]]:
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

    # --- PRECHECK ---------------------------------------------------------------------------
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

    # --- DISK_SYNC --------------------------------------------------------------------------
    async def _disk_sync(self) -> None:
        assert self.src and self.dst
        req = self.req
        for d in self.dest_spec.disks:
            await self.dst.call("disk.create", datastore=d.datastore, file=d.file, size_bytes=d.size_bytes,
                                format=d.format)
            self.created_disks.append((d.datastore, d.file))
        self.dest_started = True
        incoming = await self.dst.call("migration.prepare_incoming", spec=self.dest_spec.model_dump(),
                                       streams=req.streams, postcopy=self.ctl.postcopy_capable)
        self.uri = incoming["uri"]
        self.incoming = incoming     # the destination's NBD export and migration URI (fault injection reads it)
        if not req.spec.disks:
            return
        self.source_touched = True
        jobs = await self.src.call("migration.mirror", name=self.name, nbd_host=incoming["nbd"]["host"],
                                   nbd_port=incoming["nbd"]["port"], mode=req.mirror_mode,
                                   granularity=req.mirror_granularity)
        await self._checkpoint("disk-sync:mirror-started")
        ready: set[str] = set()
        lengths: dict[str, int] = {}

        async def poll() -> None:
            assert self.src
            while True:
                info = await self.src.call("vm.qmp", name=self.name, command="query-block-jobs")
                tot = sum(j["len"] for j in info if j["device"] in jobs) or 1
                off = sum(j["offset"] for j in info if j["device"] in jobs)
                for j in info:
                    lengths[j["device"]] = j["len"]
                self.progress.disk_pct = 100.0 * off / tot
                self.on_progress(self.progress)
                mine = [j for j in info if j["device"] in jobs]
                if len(mine) == len(jobs) and all(j["len"] and j["offset"] >= j["len"] for j in mine):
                    # every byte copied: READY follows once the destination has flushed, which the memory
                    # pre-copy need not wait for (the source agent holds the switchover until then)
                    await self.sq.put({"event": "mirror-copied", "data": {}})
                    return
                await asyncio.sleep(0.1)

        limit_s = self._disk_sync_timeout()
        deadline = time.monotonic() + limit_s
        poller = asyncio.create_task(poll())
        try:
            while ready != set(jobs):
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise TimeoutError
                    # no event for the whole wait: a stalled mirror, unless the deadline came first
                    stall_s = req.stall_timeout_s * 10
                    ev = await self._next_event(timeout_s=min(stall_s, left), what="the disk mirror",
                                                quiet=TimeoutError if left < stall_s else None)
                except TimeoutError:
                    why = ("the guest writes faster than the link takes them; use mirror mode write-blocking (the "
                           "guest's writes then wait for the destination) or a faster link"
                           if req.mirror_mode != "write-blocking" else
                           "the link carries less than the disks hold in that time; allow longer "
                           "(disk_sync_timeout_s) or use a faster link")
                    raise MigrationError(
                        f"the disk copy to {self.where(req.destination)} did not catch up in {limit_s:.0f} s "
                        f"({self.progress.disk_pct:.0f}% copied, mirror {req.mirror_mode}): {why}") from None
                if ev["event"] == "mirror-copied":
                    break
                if ev["event"] == "qmp" and ev["data"]["event"] == "BLOCK_JOB_READY":
                    ready.add(ev["data"]["data"]["device"])
                    lengths[ev["data"]["data"]["device"]] = ev["data"]["data"]["len"]
                elif ev["event"] == "qmp" and ev["data"]["event"] in ("BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED",
                                                                      "BLOCK_JOB_COMPLETED"):
                    d = ev["data"]["data"]
                    raise MigrationError(
                        f"disk mirror {d.get('device')} to {self.where(req.destination)} stopped before it was "
                        f"ready ({ev['data']['event']}, {d.get('operation') or d.get('error') or 'no detail'}): the "
                        "destination's NBD export failed or went away")
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        self.bytes.disk = sum(lengths.values())
        self.progress.disk_pct = 100.0
        self.on_progress(self.progress)

    def _disk_sync_timeout(self) -> float:
        if self.req.disk_sync_timeout_s is not None:
            return self.req.disk_sync_timeout_s
        rate = self.req.bandwidth_bps or self.req.link_bandwidth_bps
        size = sum(d.size_bytes for d in self.req.spec.disks)
        return max(DISK_SYNC_MIN_TIMEOUT_S, 3 * size / rate) if rate else DISK_SYNC_MIN_TIMEOUT_S

    async def _next_event(self, timeout_s: float, what: str,
                          quiet: type[Exception] | None = None) -> dict[str, Any]:
        """The next event from either agent; a destination or source QEMU that died is an error. No event in
        ``timeout_s``: ``MigrationError`` (no progress), or ``quiet`` when the caller's own deadline came."""
        get_s = asyncio.ensure_future(self.sq.get())
        get_d = asyncio.ensure_future(self.dq.get())
        done, pending = await asyncio.wait({get_s, get_d}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for p in pending:
            p.cancel()
        for p in pending:   # an event fetched while cancelling must not be lost
            with contextlib.suppress(asyncio.CancelledError):
                late = await p
                (self.sq if p is get_s else self.dq).put_nowait(late)
        if not done:
            if quiet is not None:
                raise quiet()
            raise MigrationError(f"no progress from {what} for {timeout_s:.0f} s")
        task = done.pop()
        ev: dict[str, Any] = task.result()
        if len(done):   # both arrived: keep the other for the next call
            other = done.pop()
            (self.sq if other is get_s else self.dq).put_nowait(other.result())
        side = "source" if task is get_s else "destination"
        clock.map_instants(ev.get("data"), self.clocks[side])   # the agent's instants onto the engine's clock
        place = self.req.source if side == "source" else self.req.destination
        if ev["event"] == "vm-exited":
            raise MigrationError(f"the {side} QEMU on {self.where(place)} exited "
                                 f"(code {ev['data'].get('returncode')})")
        if ev["event"] == "connection-lost":
            raise MigrationError(f"lost the connection to the host agent on {self.where(place)}")
        if ev["event"] == "migration-failed":
            raise MigrationError(f"the {side} reports: {ev['data'].get('error') or 'migration failed'}")
        if ev["event"] == "qmp" and ev["data"]["event"] == "MIGRATION" and \
                ev["data"]["data"].get("status") == "failed":
            raise MigrationError(f"QEMU on the {side} ({self.where(place)}) reports the migration failed")
        ev["side"] = side
        return ev

    # --- MEMORY_PRECOPY ------------------------------------------------------------------------
    async def _precopy(self) -> None:
        assert self.src
        req, ctl = self.req, self.ctl
        self.mono["migrate_s"] = time.monotonic()
        self.source_touched = True
        await self.src.call("migration.start", name=self.name, uri=self.uri, streams=req.streams,
                            auto_converge=ctl.auto_converge, max_bandwidth_bps=req.bandwidth_bps,
                            downtime_limit_ms=req.downtime_limit_ms, hold_switchover=req.hold_switchover,
                            max_throttle_pct=req.max_throttle_pct, postcopy=ctl.postcopy_capable,
                            sdps=ctl.start_sdps())
        if ctl.sdps_on:
            self._decide(0, "sdps", req.convergence.sdps_max_stun_pct,
                         f"SDPS on: the source host agent stuns the vCPUs in {req.convergence.sdps_slice_ms} ms "
                         f"slices, up to {req.convergence.sdps_max_stun_pct}%, as the rates demand")
        await self._checkpoint("memory-precopy:started")
        last_bytes, last_move = -1, time.monotonic()
        round_start: dict[str, Any] | None = None
        last: dict[str, Any] | None = None
        deadline = self.mono["migrate_s"] + self.timeout_s
        while True:
            ev = await self._next_event(timeout_s=req.stall_timeout_s, what="the memory pre-copy")
            if ev["event"] == "migration-progress":
                s = last = ev["data"]
                if round_start is None:
                    round_start = s
                elif s["dirty_sync_count"] > round_start["dirty_sync_count"]:
                    self._close_round(round_start, s)
                    round_start = s
                    if s.get("status") == "active":
                        await self._control(s)
                self._update_progress(s)
                if s["transferred_bytes"] != last_bytes:
                    last_bytes, last_move = s["transferred_bytes"], time.monotonic()
                elif time.monotonic() - last_move > req.stall_timeout_s:
                    raise MigrationError(f"the vMotion network stalled: no memory sent for "
                                         f"{req.stall_timeout_s:.0f} s (is the link between "
                                         f"{req.source.host.name} and {req.destination.host.name} up?)")
                if time.monotonic() > deadline and not ctl.postcopy_started:
                    act = ctl.on_timeout()
                    if act is not None:
                        await self._apply(act)
                    else:
                        send = self.rounds[-1].throughput_bps if self.rounds else s["mbps"] * 1e6 / 8
                        msg = ctl.give_up_message(s["dirty_rate_pps"] * PAGE, send)
                        self._decide(len(self.rounds), "abort", None, msg)
                        raise MigrationError(msg)
            elif ev["event"] == "migration-sdps":
                d = ev["data"]
                prev = next((x for x in reversed(self.decisions) if x.action == "stun"), None)
                if prev is None or prev.value != d["stun_pct"]:
                    slice_ms, single, cpu = d.get("slice_ms"), d.get("single_stun_ms"), d.get("cpu_pct")
                    self._decide(len(self.rounds), "stun", d["stun_pct"],
                                 f"{d['method']}{f', {slice_ms} ms slices' if slice_ms else ''}"
                                 f"{f', single stun {single:g} ms' if single else ''}: dirty "
                                 f"{d['dirty_bps'] / 1e6:.1f} MB/s vs send {d['send_bps'] / 1e6:.1f} MB/s"
                                 f"{f' with {cpu:g}% of a vCPU' if cpu is not None else ''}, "
                                 f"{d['remaining_bytes'] / 2**20:.0f} MiB dirty"
                                 f"{'; at the ceiling and still as fast as the link' if d.get('exhausted') else ''}",
                                 t=d["t_s"])
            elif ev["event"] == "qmp" and ev["data"]["event"] == "MIGRATION" and \
                    ev["data"]["data"].get("status") == "pre-switchover" and ev["side"] == "source":
                if round_start is not None and last is not None and last is not round_start:
                    self._close_round(round_start, last)
                self.mono["paused_s"] = ev["data"]["monotonic_s"]
                self._enter(Phase.SWITCHOVER, at=ev["data"]["monotonic_s"])
                return
            elif ev["event"] == "qmp" and ev["data"]["event"] == "MIGRATION" and \
                    ev["data"]["data"].get("status") == "cancelled":
                raise MigrationError("the migration was cancelled on the source")

    def _decide(self, rnd: int, action: str, value: float | None, detail: str, t: float | None = None) -> None:
        at = (t if t is not None else time.monotonic()) - self.machine.t0
        self.decisions.append(Decision(round=rnd, t_s=round(at, 3), action=action, value=value, detail=detail))
        if rnd and rnd <= len(self.rounds):
            self.rounds[rnd - 1].decisions.append(f"{action}" + (f" {value:g}" if value is not None else ""))

    async def _control(self, s: dict[str, Any]) -> None:
        """A round ended: ask the controller, apply what it decides."""
        r = self.rounds[-1]
        stats = RoundStats(n=r.n, elapsed_s=s["t_s"] - self.mono["migrate_s"], dirty_bps=r.dirty_rate_pps * PAGE,
                           send_bps=r.throughput_bps, remaining_bytes=int(s["remaining_bytes"]),
                           throttle_pct=int(s["throttle_pct"]), stun_pct=float(s.get("stun_pct", 0.0)),
                           sdps_exhausted=bool(s.get("sdps_exhausted", False)))
        for act in self.ctl.on_round(stats):
            await self._apply(act)

    async def _apply(self, act: Action) -> None:
        assert self.src
        n = len(self.rounds)
        if act.kind == "downtime-limit":
            assert act.value is not None
            await self.src.call("migration.tune", name=self.name, downtime_limit_ms=int(act.value))
            self._decide(n, "downtime-limit", act.value, act.why)
        elif act.kind == "postcopy":
            await self.src.call("migration.start_postcopy", name=self.name)
            self.postcopy = Postcopy(requested_s=round(time.monotonic() - self.machine.t0, 4))
            self.progress.postcopy = True
            self._decide(n, "postcopy", None, f"switch to post-copy: {act.why}")
        elif act.kind == "abort":
            self._decide(n, "abort", None, act.why)
            raise MigrationError(act.why)

    def _close_round(self, a: dict[str, Any], b: dict[str, Any]) -> None:
        dt = max(b["t_s"] - a["t_s"], 1e-6)
        sent = b["transferred_bytes"] - a["transferred_bytes"]
        t0 = self.machine.t0
        self.rounds.append(Round(n=len(self.rounds) + 1, start_s=round(a["t_s"] - t0, 3),
                                 end_s=round(b["t_s"] - t0, 3),
                                 dirty_rate_pps=int(b["dirty_rate_pps"]), transferred_bytes=sent,
                                 remaining_bytes=int(a["remaining_bytes"]), throttle_pct=int(b["throttle_pct"]),
                                 throughput_bps=round(sent / dt, 1), stun_pct=float(b.get("stun_pct", 0.0)),
                                 downtime_limit_ms=self.ctl.downtime_now_ms))
        prev = self.rounds[-2].throttle_pct if len(self.rounds) > 1 else 0
        if self.rounds[-1].throttle_pct != prev:
            self._decide(len(self.rounds), "throttle", self.rounds[-1].throttle_pct,
                         f"QEMU cpu-throttle: vCPU sleeps "
                         f"{10 * self.rounds[-1].throttle_pct / max(1, 100 - self.rounds[-1].throttle_pct):.0f} "
                         f"ms per 10 ms run", t=b["t_s"])

    def _update_progress(self, s: dict[str, Any]) -> None:
        p = self.progress
        p.round = len(self.rounds) + 1
        p.dirty_rate_bps = s["dirty_rate_pps"] * PAGE
        p.send_rate_bps = s["mbps"] * 1e6 / 8
        p.throttle_pct = s["throttle_pct"]
        p.remaining_bytes = s["remaining_bytes"]
        p.transferred_bytes = s["transferred_bytes"]
        p.stun_pct = float(s.get("stun_pct", 0.0))
        self.on_progress(p)

    # --- SWITCHOVER ------------------------------------------------------------------------------
    async def _switchover(self) -> None:
        assert self.src and self.dst
        if self.req.hold_switchover:
            await self._checkpoint("switchover:held")
            await self.src.call("migration.release_switchover", name=self.name)
        while "resumed_s" not in self.mono:
            ev = await self._next_event(timeout_s=60, what="the switchover")
            if ev["event"] == "migration-switchover":
                self.mono.update({k: v for k, v in ev["data"].items() if k in ("mirror_done_s", "continued_s")})
            elif ev["event"] == "migration-resumed":
                self.mono.update({k: v for k, v in ev["data"].items()
                                  if k in ("completed_s", "resumed_s", "postcopy_s", "nbd_stopped_s", "bitmaps_s",
                                           "cont_s")})
        if self.postcopy is not None:
            await self._postcopy_finish()
        qemu_steps = await self._qemu_steps()
        final = await self.src.call("vm.qmp", name=self.name, command="query-migrate")
        ram = final.get("ram", {})
        self.downtime.reported = final.get("downtime")
        if "src-downtime-start" in qemu_steps and "resumed_s" in self.mono:
            self.downtime.stop_to_resume = round((self.mono["resumed_s"] - qemu_steps["src-downtime-start"]) * 1000, 1)
            # how long the guest's clock stood still: to the start of cont, where the guest runs again
            self.frozen_s = self.mono.get("cont_s", self.mono["resumed_s"]) - qemu_steps["src-downtime-start"]
        self.bytes.memory = int(ram.get("transferred", 0))
        t0 = self.machine.t0
        self.switch = Switchover(**{k: round(self.mono[m] - t0, 4) for k, m in (
            ("source_paused_s", "paused_s"), ("mirror_done_s", "mirror_done_s"), ("continued_s", "continued_s"),
            ("completed_s", "completed_s"), ("destination_nbd_stopped_s", "nbd_stopped_s"),
            ("destination_bitmaps_s", "bitmaps_s"), ("destination_resumed_s", "resumed_s")) if m in self.mono},
            qemu={k: round(v - t0, 4) for k, v in sorted(qemu_steps.items(), key=lambda kv: kv[1])})

    async def _qemu_steps(self) -> dict[str, float]:
        """QEMU's own switchover checkpoints on both sides (its downtime trace), on the engine's clock."""
        assert self.src and self.dst
        steps: dict[str, float] = {}
        for side, agent in (("source", self.src), ("destination", self.dst)):
            try:
                got = await agent.call("vm.downtime_trace", name=self.name)
            except TestbedError:
                continue
            clock.map_instants(got, self.clocks[side])
            steps.update({k.removesuffix("_s"): float(v) for k, v in got.items()})
        return steps

    async def _postcopy_finish(self) -> None:
        """The guest runs on the destination; its remaining pages come from the source. Wait for the last
        one; a broken channel pauses both sides, and the engine reconnects them (post-copy recovery)."""
        assert self.src and self.dst and self.postcopy is not None
        pc, req, t0 = self.postcopy, self.req, self.machine.t0
        pc.destination_running_s = round(self.mono["resumed_s"] - t0, 4)
        await self._checkpoint("postcopy:running")
        last_tx, last_move = -1, time.monotonic()
        recovered_at = 0.0
        while True:
            ev = await self._next_event(timeout_s=req.stall_timeout_s, what="the post-copy")
            if ev["side"] != "source":
                continue
            if ev["event"] == "qmp" and ev["data"]["event"] == "MIGRATION" and \
                    ev["data"]["data"].get("status") == "completed":
                pc.completed_s = round(ev["data"]["monotonic_s"] - t0, 4)
                return
            if ev["event"] != "migration-progress":
                continue
            st = ev["data"]
            if st["t_s"] < recovered_at:
                continue   # sampled while the channel was down, queued behind the recovery: not news
            self._update_progress(st)
            if st["status"] == "completed":
                pc.completed_s = round(st["t_s"] - t0, 4)
                return
            if st["transferred_bytes"] != last_tx:
                last_tx, last_move = st["transferred_bytes"], time.monotonic()
            stuck = st["status"] == "postcopy-active" and time.monotonic() - last_move > req.stall_timeout_s
            if stuck or st["status"] == "postcopy-paused":
                await self._postcopy_recover(stuck)
                last_tx, last_move = -1, time.monotonic()
                recovered_at = time.monotonic()

    async def _postcopy_recover(self, stuck: bool) -> None:
        assert self.src and self.dst and self.postcopy is not None
        req, pc = self.req, self.postcopy
        pc.pauses += 1
        n = len(self.rounds)
        why = (f"no post-copy page sent for {req.stall_timeout_s:.0f} s" if stuck
               else "the source reports postcopy-paused")
        self._decide(n, "postcopy-pause", None, f"{why}: both sides paused (migrate-pause); the guest waits on "
                                                "the destination for pages only the source has")
        for agent in (self.src, self.dst):
            with contextlib.suppress(TestbedError):
                await agent.call("migration.pause", name=self.name)
        deadline = time.monotonic() + req.postcopy_recovery_timeout_s
        uri: str | None = None
        tries = 0
        seen = {"destination": "?", "source": "?", "resume": "not tried"}
        while time.monotonic() < deadline:
            dst_st = (await self.dst.call("vm.qmp", name=self.name, command="query-migrate")).get("status")
            src_st = (await self.src.call("vm.qmp", name=self.name, command="query-migrate")).get("status")
            seen.update(destination=str(dst_st), source=str(src_st))
            if src_st == "completed":
                return
            if src_st in ("postcopy-active", "postcopy-recover") and dst_st in ("postcopy-active", "postcopy-recover") \
                    and tries:
                pc.recoveries += 1
                self._decide(n, "postcopy-recover", None, f"reconnected to {uri} after {tries} tries "
                             "(migrate-recover on the destination, migrate resume=true on the source)")
                return
            if "postcopy-active" in (src_st, dst_st) and not tries:
                # a side whose read of the dead channel has not failed yet: pause it again
                for agent, st in ((self.src, src_st), (self.dst, dst_st)):
                    if st == "postcopy-active":
                        with contextlib.suppress(TestbedError):
                            await agent.call("migration.pause", name=self.name)
            elif src_st == "postcopy-paused" and dst_st in ("postcopy-paused", "postcopy-recover-setup"):
                if uri is None:
                    try:
                        uri = (await self.dst.call("migration.recover", name=self.name))["uri"]
                    except TestbedError as err:
                        seen["resume"] = f"migrate-recover on the destination: {err.message.splitlines()[0]}"
                if uri is not None:
                    res = await self.src.call("migration.resume", name=self.name, uri=uri)
                    seen["resume"] = "started" if res["resumed"] else res.get("why", "refused")
                    tries += 1 if res["resumed"] else 0
            await asyncio.sleep(1.0)
        raise MigrationError(
            f"post-copy of {self.name} lost its channel ({why}) and the vMotion network between "
            f"{req.source.host.name} and {req.destination.host.name} did not come back within "
            f"{req.postcopy_recovery_timeout_s:.0f} s (last seen: source {seen['source']}, destination "
            f"{seen['destination']}, reconnect: {seen['resume']}): the guest's memory is split between both "
            "hosts, so it "
            "cannot run on either. Both QEMUs are kept (source paused, destination waiting for pages) "
            "for inspection; nothing was committed. Restore the link and resume by hand "
            "(migrate-recover on the destination, migrate resume=true on the source), or delete the VM")

    # --- VERIFY ------------------------------------------------------------------------------------
    async def _verify(self) -> None:
        assert self.src and self.dst
        await self._checkpoint("verify")
        integ = self.integrity
        # the observer timestamps heartbeats with its own clock: ask it in its terms
        ob = self.clocks["observer"]
        paused, resumed = ob.to_remote(self.mono["paused_s"]), ob.to_remote(self.mono["resumed_s"])
        st = await self.dst.call("vm.status", name=self.name)
        if st.get("status") != "running":
            integ.details.append(f"destination QEMU is {st.get('status')}, not running")
        if self.req.builtin_guest:
            # The last heartbeat before the pause: both checks below compare against it.
            self.hb_before = await integrity.heartbeat_before(self.req.observer_socket, self.name, paused)
            # Digesting the disks takes the CPU (here, both cores): not before the guest is up again, or the check
            # would lengthen the downtime it measures.
            await integrity.guest_back(self.req.observer_socket, self.name, resumed)
        disk_task = asyncio.create_task(self._verify_disks())
        try:
            if self.req.builtin_guest:
                await self._verify_guest(paused, resumed)
            else:
                integ.guest_running = st.get("status") == "running"
                integ.memory = "unverified"
                integ.details.append("memory unverified: the guest has no testbed agent")
        except BaseException:
            disk_task.cancel()
            await asyncio.gather(disk_task, return_exceptions=True)
            raise
        await disk_task

    async def _verify_guest(self, paused: float, resumed: float) -> None:
        ob = self.clocks["observer"]
        times = await integrity.check_guest(
            self.req.observer_socket, self.name, self.hb_before, precopy_s=ob.to_remote(self.mono["migrate_s"]),
            paused_s=paused, resumed_s=resumed, workload=self.req.workload, integ=self.integrity,
            frozen_s=self.frozen_s,
            threshold_ms=self.stalls.threshold_ms)
        self.stalls = times.stalls
        self.downtime.observed = times.observed_ms
        self.downtime.observed_naive = times.naive_ms
        self.downtime.path_change = times.path_change_ms
        if times.gap_start_s is not None and times.gap_end_s is not None:
            self.switch.heartbeat_gap_start_s = round(ob.to_engine(times.gap_start_s) - self.machine.t0, 4)
            self.switch.heartbeat_gap_end_s = round(ob.to_engine(times.gap_end_s) - self.machine.t0, 4)

    async def _verify_disks(self) -> None:
        assert self.src and self.dst
        integ = self.integrity
        spec = self.req.spec
        if not spec.disks:
            integ.disk = "none"
            integ.details.append("disk: none, the VM has no disks")
            return
        verdicts = []
        for i, s_disk in enumerate(spec.disks):
            # the source image is frozen (its QEMU inactivated it at the end of the migration): its file is read;
            # the destination's guest runs: read through its QEMU at one instant, with what it wrote since
            try:
                a, b = await asyncio.gather(
                    self.src.call("disk.digest", datastore=s_disk.datastore, file=s_disk.file, timeout_s=300),
                    self.dst.call("disk.digest_live", name=self.name, disk=i, timeout_s=300))
            except TestbedError as err:
                integ.details.append(f"disk {s_disk.file} unverified: could not compare ({err.message})")
                verdicts.append("unverified")
                continue
            verdicts.append(self._judge_disk(s_disk.file, a, b))
        integ.disk = "failed" if "failed" in verdicts else ("unverified" if "unverified" in verdicts else "verified")

    def _judge_disk(self, file: str, src: dict[str, Any], dst: dict[str, Any]) -> str:
        return integrity.judge_disk(file, src, dst, builtin_guest=self.req.builtin_guest, workload=self.req.workload,
                                    hb0=self.hb_before, details=self.integrity.details)

    async def _keep_source(self) -> None:
        """FAILED or UNVERIFIED: the destination runs the VM; the source QEMU stays, paused, with its disks."""
        assert self.src and self.dst
        self.source_kept = True
        for side in (self.src, self.dst):
            with contextlib.suppress(TestbedError, TimeoutError):
                await side.call("migration.finish", name=self.name, timeout_s=ROLLBACK_CALL_S)

    # --- COMMIT ---------------------------------------------------------------------------------------
    async def _commit(self) -> None:
        assert self.src and self.dst
        with contextlib.suppress(TestbedError):
            console = (await self.src.call("vm.console_log", name=self.name))["text"]
            await self.dst.call("vm.import_console_history", name=self.name, text=console)
        await self.src.call("migration.finish", name=self.name)
        await self.dst.call("migration.finish", name=self.name)
        await remove_vm(self.src, self.req.spec, strict=True)

    # --- ROLLBACK ------------------------------------------------------------------------------------------
    async def _rollback(self, why: str) -> None:
        self.error = why
        if self.machine.phase in (Phase.COMMIT, Phase.DONE, Phase.FAILED, Phase.ROLLED_BACK, Phase.ROLLBACK):
            return
        if self.machine.phase is Phase.CREATED:
            self.machine.enter(Phase.PRECHECK)
        log = self.rollback_log
        assert self.src and self.dst
        # The destination may be out of reach (a cut link): each call there gets a time limit, and the
        # rollback goes on without it (what could not be removed is said in the log).
        t = ROLLBACK_CALL_S
        dest_stopped = not self.dest_started
        if self.dest_started:
            # The destination goes first, in one call that refuses once the guest runs there (it resumes by
            # itself when the source completes): never two running copies.
            try:
                r = await self.dst.call("migration.abort_incoming", name=self.name, timeout_s=t)
                log += r["undone"] or [f"destination QEMU on {self.req.destination.host.name} was not running"]
                dest_stopped = True
            except Conflict:
                log.append("the destination already runs the VM: not rolled back; the source VM and disk "
                           "are kept, paused, for inspection")
                self._enter(Phase.FAILED)
                self.source_kept = True
                return
            except NotFound:
                dest_stopped = True
                log.append(f"destination QEMU on {self.req.destination.host.name}: not there")
            except TestbedError as err:
                log.append(f"destination QEMU: {err.message.splitlines()[0]}")
            except TimeoutError:
                log.append(f"destination QEMU on {self.req.destination.host.name}: its agent did not answer in "
                           f"{t:.0f} s; the QEMU there waits for an incoming migration that will never come")
        self._enter(Phase.ROLLBACK)
        if self.dest_started:
            with contextlib.suppress(TestbedError, TimeoutError):
                await self.dst.call("vm.remove", name=self.name, timeout_s=t)
            with contextlib.suppress(TestbedError, TimeoutError):
                await self.dst.call("migration.finish", name=self.name, timeout_s=t)
        for ds, f in self.created_disks:
            try:
                await self.dst.call("disk.delete", datastore=ds, file=f, timeout_s=t)
                log.append(f"destination disk {f} deleted")
            except TestbedError as err:
                log.append(f"destination disk {f}: {err.message}")
            except TimeoutError:
                log.append(f"destination disk {f}: the agent on {self.req.destination.host.name} did not answer "
                           f"in {t:.0f} s; the disk is left there")
        try:
            undone = await self.src.call("migration.cancel", name=self.name, resume_completed=dest_stopped)
            log += undone["undone"]
        except TestbedError as err:
            log.append(f"source: {err.message}")
        else:
            if undone.get("completed") and not dest_stopped:
                # the source handed the guest over and the destination could not be stopped: whether it runs
                # there is unknown, so the source stays paused (kept) rather than risk two running copies
                log.append(f"the source's migration had completed and {self.where(self.req.destination)} could "
                           "not be reached to stop the VM there: it may run there; the source copy stays paused")
                self._enter(Phase.FAILED)
                self.source_kept = True
                return
        self._enter(Phase.ROLLED_BACK)

    # --- the report --------------------------------------------------------------------------------------------
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
