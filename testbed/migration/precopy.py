"""MEMORY_PRECOPY: ``migrate`` (multifd streams), every round recorded, the convergence controller
(``convergence``: auto-converge, SDPS, downtime steps, post-copy) deciding at each round's end."""

from __future__ import annotations

import time
from typing import Any

from testbed.errors import MigrationError
from testbed.hostd.protocol import EventKind
from testbed.migration.convergence import Action, RoundStats
from testbed.migration.phases import Phase
from testbed.migration.report import Postcopy, Round
from testbed.migration.state import PAGE, MoveState


class PrecopyPhase(MoveState):
    """The iterative pre-copy, until the source pauses at pre-switchover."""

    async def _precopy(self) -> None:
        assert self.src
        req, ctl = self.req, self.ctl
        self.at.migrate_s = started = time.monotonic()
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
        deadline = started + self.timeout_s
        while True:
            ev = await self._next_event(timeout_s=req.stall_timeout_s, what="the memory pre-copy")
            if ev.kind is EventKind.MIGRATION_PROGRESS:
                s = last = ev.data
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
            elif ev.kind is EventKind.MIGRATION_SDPS:
                d = ev.data
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
            elif ev.migration_status() == "pre-switchover" and ev.side == "source" and ev.at_s is not None:
                if round_start is not None and last is not None and last is not round_start:
                    self._close_round(round_start, last)
                self.at.paused_s = ev.at_s
                self._enter(Phase.SWITCHOVER, at=ev.at_s)
                return
            elif ev.migration_status() == "cancelled":
                raise MigrationError("the migration was cancelled on the source")

    async def _control(self, s: dict[str, Any]) -> None:
        """A round ended: ask the controller, apply what it decides."""
        r = self.rounds[-1]
        stats = RoundStats(n=r.n, elapsed_s=s["t_s"] - self.at.of("migrate_s"), dirty_bps=r.dirty_rate_pps * PAGE,
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
