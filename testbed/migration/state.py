"""A move's state, shared by its phases: the agents, what was created where, the instants (``Instants``), the
figures of the report being built, and the helpers every phase uses (the next agent event, a decision)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from testbed.errors import MigrationError
from testbed.hostd.protocol import AgentEvent, EventKind
from testbed.hosts.agent import Agent
from testbed.migration import clock
from testbed.migration.convergence import Controller, completion_timeout_s
from testbed.migration.phases import Phase, PhaseMachine
from testbed.migration.report import Bytes, Decision, Downtime, Integrity, Postcopy, Round, Stalls, Switchover
from testbed.migration.request import MigrationRequest, Place, Progress

PAGE = 4096
ROLLBACK_CALL_S = 30.0     # a rollback waits this long for each call to an agent that may be out of reach


# Fault injection and experiments: called at named checkpoints, e.g. to kill a QEMU or cut the link there.
# Checkpoints: "precheck", "disk-sync:mirror-started", "memory-precopy:started",
# "switchover:held" (only with hold_switchover), "postcopy:running" (the destination runs the guest,
# pages still on the source), "verify".
FaultHook = Callable[[str, "MoveState"], Awaitable[None]]


@dataclass
class Instants:
    """The move's instants on the engine's clock (``time.monotonic``); None until it happened."""

    migrate_s: float | None = None       # migrate started on the source
    paused_s: float | None = None        # the source stopped the guest (pre-switchover)
    mirror_done_s: float | None = None   # the source agent saw the disk mirrors complete
    continued_s: float | None = None     # ... and let QEMU finish the migration
    completed_s: float | None = None     # the destination agent saw the migration complete
    postcopy_s: float | None = None
    nbd_stopped_s: float | None = None   # the destination stopped its NBD export
    bitmaps_s: float | None = None
    cont_s: float | None = None          # cont started on the destination: the guest runs again
    resumed_s: float | None = None       # cont returned

    def take(self, data: dict[str, Any], *names: str) -> None:
        """Copy the named instants an agent reported (already on the engine's clock) into this record."""
        for n in names:
            if data.get(n) is not None:
                setattr(self, n, float(data[n]))

    def of(self, name: str) -> float:
        """An instant the move needs at this point: its absence is the agents' failure to report it."""
        v = getattr(self, name)
        if v is None:
            raise MigrationError(f"the host agents did not report the move's {name.removesuffix('_s')} instant")
        return float(v)


class MoveState:
    """One move's state; the phases (one class each) act on it."""

    sq: asyncio.Queue[dict[str, Any]]     # the source agent's events for this VM (while the move runs)
    dq: asyncio.Queue[dict[str, Any]]     # the destination agent's

    def __init__(self, req: MigrationRequest, *, on_progress: Callable[[Progress], None] | None = None,
                 fault: FaultHook | None = None) -> None:
        self.req = req
        self.name = req.spec.name
        self.machine = PhaseMachine()
        self.on_progress = on_progress or (lambda p: None)
        self.fault = fault
        self.src: Agent | None = None
        self.dst: Agent | None = None
        self.dest_spec = req.spec.moved_to(req.destination.datastore)
        self.created_disks: list[tuple[str, str]] = []
        self.dest_started = False
        self.source_touched = False
        self.rounds: list[Round] = []
        self.hb_before: dict[str, Any] | None = None   # last heartbeat before the switchover
        self.frozen_s: float | None = None   # the source QEMU's stop to the start of cont on the destination
        self.switch = Switchover()
        self.at = Instants()
        self.bytes = Bytes()
        self.downtime = Downtime(reported=None, observed=None)
        self.stalls = Stalls()
        self.integrity = Integrity()
        self.incoming: dict[str, Any] = {}     # the destination's NBD export and migration URI
        self.uri = ""                           # where the source sends the migration stream
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
        self.last_events: dict[str, tuple[str, float]] = {}     # side: the kind of its last event, when (a stall's why)
        self.postcopy: Postcopy | None = None
        # events read from an agent's queue but not yet handed to a phase, in their order (``_take``)
        self._unread: dict[str, collections.deque[dict[str, Any]]] = {
            "source": collections.deque(), "destination": collections.deque()}

    def _enter(self, phase: Phase, at: float | None = None) -> None:
        self.machine.enter(phase, at)
        self.progress.phase = phase
        self.on_progress(self.progress)

    async def _checkpoint(self, name: str) -> None:
        if self.fault is not None:
            await self.fault(name, self)

    def where(self, place: Place) -> str:
        return f"host {place.host.name} ({place.vcenter})"

    async def _take(self, timeout_s: float) -> tuple[str, dict[str, Any]] | None:
        """The next raw event and its side, None after ``timeout_s`` without one. Order is kept: what was read but
        not yet handed out comes first, then what already waits, the source's before the destination's (the
        source's steps come first in every phase: its pre-switchover before the destination's resume)."""
        for side, q in (("source", self.sq), ("destination", self.dq)):
            if self._unread[side]:
                return side, self._unread[side].popleft()
            if not q.empty():
                return side, q.get_nowait()
        get_s = asyncio.ensure_future(self.sq.get())
        get_d = asyncio.ensure_future(self.dq.get())
        done, pending = await asyncio.wait({get_s, get_d}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for p in pending:
            p.cancel()
        for p in pending:   # an event fetched while cancelling must not be lost
            with contextlib.suppress(asyncio.CancelledError):
                late = await p
                self._unread["source" if p is get_s else "destination"].append(late)
        if not done:
            return None
        if get_d in done and get_s in done:    # both arrived: the destination's waits, first in its line
            self._unread["destination"].append(get_d.result())
            return "source", get_s.result()
        task = done.pop()
        return ("source" if task is get_s else "destination"), task.result()

    async def _next_event(self, timeout_s: float, what: str,
                          quiet: type[Exception] | None = None) -> AgentEvent:
        """The next event from either agent; a destination or source QEMU that died is an error. No event in
        ``timeout_s``: ``MigrationError`` (no progress), or ``quiet`` when the caller's own deadline came.

        The switchover's instants are taken here, whichever phase reads their events: an engine that fell
        behind (held at a checkpoint, or slow on a loaded machine) reads the destination's resume while it still
        reads pre-copy, and must not lose it."""
        got = await self._take(timeout_s)
        if got is None:
            if quiet is not None:
                raise quiet()
            now = time.monotonic()
            seen = "; ".join(f"the {side}'s last event: {k} {now - t:.1f} s ago"
                             for side, (k, t) in self.last_events.items()) or "no event from either agent yet"
            raise MigrationError(f"no progress from {what} for {timeout_s:.0f} s ({seen})")
        side, raw = got
        ev = AgentEvent.parse(raw)
        self.last_events[side] = (ev.raw_kind or str(ev.kind), time.monotonic())
        clock.map_instants(ev.data, self.clocks[side])   # the agent's instants onto the engine's clock
        if ev.kind is EventKind.MIGRATION_SWITCHOVER:
            self.at.take(ev.data, "mirror_done_s", "continued_s")
        elif ev.kind is EventKind.MIGRATION_RESUMED:
            self.at.take(ev.data, "completed_s", "postcopy_s", "nbd_stopped_s", "bitmaps_s", "cont_s", "resumed_s")
        place = self.req.source if side == "source" else self.req.destination
        if ev.kind is EventKind.VM_EXITED:
            raise MigrationError(f"the {side} QEMU on {self.where(place)} exited "
                                 f"(code {ev.data.get('returncode')})")
        if ev.kind is EventKind.CONNECTION_LOST:
            raise MigrationError(f"lost the connection to the host agent on {self.where(place)}")
        if ev.kind is EventKind.MIGRATION_FAILED:
            raise MigrationError(f"the {side} reports: {ev.data.get('error') or 'migration failed'}")
        if ev.migration_status() == "failed":
            raise MigrationError(f"QEMU on the {side} ({self.where(place)}) reports the migration failed")
        ev.side = side
        return ev

    def _decide(self, rnd: int, action: str, value: float | None, detail: str, t: float | None = None) -> None:
        at = (t if t is not None else time.monotonic()) - self.machine.t0
        self.decisions.append(Decision(round=rnd, t_s=round(at, 3), action=action, value=value, detail=detail))
        if rnd and rnd <= len(self.rounds):
            self.rounds[rnd - 1].decisions.append(f"{action}" + (f" {value:g}" if value is not None else ""))

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
