"""How migrations look in a terminal (rich): the live progress line of a move or a vCenter task, the prechecks,
the summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from testbed.migration.phases import Phase
from testbed.migration.report import MigrationReport
from testbed.migration.request import Progress
from testbed.units import format_bytes


def task_progress_line(vm: str, t: dict[str, Any]) -> Text:
    """A vCenter task's progress (its REST form), one line."""
    p = t.get("progress") or {}
    parts = [f"{vm}: {p.get('phase', '?')} {p.get('percent', 0):5.1f}%"]
    if p.get("round"):
        parts.append(f"round {p['round']}")
        parts.append(f"dirty {p.get('dirty_rate_bps', 0) / 1e6:6.1f} MB/s vs send "
                     f"{p.get('send_rate_bps', 0) / 1e6:6.1f} MB/s")
        parts.append(f"throttle {p.get('throttle_pct', 0)}%")
        parts.append(f"remaining {format_bytes(p.get('remaining_bytes', 0))}")
    return Text(" | ".join(parts))


def print_prechecks(console: Console, checks: list[dict[str, Any]]) -> None:
    """A relocate task's named prechecks as a table (nothing if there are none)."""
    if not checks:
        return
    table = Table("precheck", "result", "detail", title="prechecks")
    style = {"ok": "green", "warning": "yellow", "error": "bold red"}
    for ch in checks:
        table.add_row(ch["name"], Text(ch["status"], style=style[ch["status"]]),
                      ch["message"] + (f"\n→ {ch['hint']}" if ch.get("hint") and ch["status"] != "ok" else ""))
    console.print(table)


def progress_line(vm: str, p: Progress) -> Text:
    parts = [f"{vm}: {p.phase.value}"]
    if p.disk_pct is not None:
        parts.append(f"disk {p.disk_pct:5.1f}%")
    if p.phase in (Phase.MEMORY_PRECOPY, Phase.SWITCHOVER) or p.round:
        parts.append(f"round {p.round}")
        parts.append(f"dirty {p.dirty_rate_bps / 1e6:6.1f} MB/s vs send {p.send_rate_bps / 1e6:6.1f} MB/s")
        parts.append(f"throttle {p.throttle_pct:2d}%")
        if p.stun_pct:
            parts.append(f"stun {p.stun_pct:4.1f}%")
        if p.postcopy:
            parts.append("POST-COPY")
        parts.append(f"remaining {format_bytes(p.remaining_bytes)}")
    return Text(" | ".join(parts))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def summary(r: MigrationReport) -> Group:
    style = {"succeeded": "bold green", "unverified": "bold yellow", "rolled_back": "bold yellow",
             "failed": "bold red"}[r.result]
    head = Text.assemble((f"{r.vm}: {r.result.upper()}", style),
                         f"  {r.source.host} ({r.source.vcenter}, {r.source.datastore}) -> "
                         f"{r.destination.host} ({r.destination.vcenter}, {r.destination.datastore}) "
                         f"in {r.total_s:.2f} s, {r.streams} stream(s), converge {r.converge}")
    phases = Table("phase", "start", "end", "duration", title="phase timeline")
    for p in r.phases:
        phases.add_row(p.name, f"{p.start_s:.3f} s", f"{p.end_s:.3f} s", f"{(p.end_s - p.start_s) * 1000:.0f} ms")
    facts = Table("measure", "value", title="what moved and what the guest felt")
    facts.add_row("disk bytes (mirror)", format_bytes(r.bytes.disk))
    facts.add_row("memory bytes (pre-copy + stop-and-copy)", format_bytes(r.bytes.memory))
    facts.add_row("pre-copy rounds", str(len(r.rounds)))
    facts.add_row("max throttle", f"{max((x.throttle_pct for x in r.rounds), default=0)}%")
    if any(x.stun_pct for x in r.rounds) or any(d.action == "stun" for d in r.decisions):
        stun = max((d.value or 0 for d in r.decisions if d.action == "stun"), default=0)
        facts.add_row("max SDPS stun", f"{stun:g}%")
    if r.postcopy is not None:
        facts.add_row("post-copy", f"requested at {r.postcopy.requested_s} s, destination running at "
                      f"{r.postcopy.destination_running_s} s, complete at {r.postcopy.completed_s} s, "
                      f"{r.postcopy.pauses} channel failures, {r.postcopy.recoveries} recoveries")
    facts.add_row("downtime reported by QEMU", _ms(r.downtime_ms.reported))
    facts.add_row("downtime stop to resume (one clock)", _ms(r.downtime_ms.stop_to_resume))
    facts.add_row("downtime observed (heartbeat outage)", _ms(r.downtime_ms.observed))
    if r.downtime_ms.path_change is not None:
        facts.add_row("heartbeat path: one-way delay after minus before the move", _ms(r.downtime_ms.path_change))
    facts.add_row(f"pre-copy stalls >= {r.stalls_ms.threshold_ms:.0f} ms: max / total",
                  f"{_ms(r.stalls_ms.max)} / {_ms(r.stalls_ms.total)}")
    i = r.integrity
    facts.add_row("integrity: memory / disk / guest running", f"{i.memory} / {i.disk} / {i.guest_running}")
    if r.source_kept:
        facts.add_row("source copy", f"kept, paused, disks untouched (`testbed vm discard-source {r.vm}`)")
    if r.machine:
        q = r.machine
        facts.add_row("machine during the move", f"load {q['load_at_start'][0]:.2f} -> {q['load_at_end'][0]:.2f} "
                      f"(max {q['max_load_1m']:.2f}), CPU steal {q['steal_pct']:g}%"
                      + (" LOADED: retake on a quiet machine" if q.get("loaded") else ""))
    parts: list[Table | Text] = [head, phases]
    if r.rounds:
        rounds = Table("round", "dirty rate", "sent", "remaining at start", "throttle", "throughput",
                       title="pre-copy rounds")
        for x in r.rounds:
            rounds.add_row(str(x.n), f"{x.dirty_rate_pps * 4096 / 1e6:.1f} MB/s", format_bytes(x.transferred_bytes),
                           format_bytes(x.remaining_bytes), f"{x.throttle_pct}%", f"{x.throughput_bps / 1e6:.1f} MB/s")
        parts.append(rounds)
    parts.append(facts)
    for dec in r.decisions:
        parts.append(Text(f"  round {dec.round} (+{dec.t_s:.1f} s): {dec.action}"
                          f"{'' if dec.value is None else f' {dec.value:g}'}: {dec.detail}"))
    for d in i.details:
        parts.append(Text(f"  {d}"))
    if r.error:
        parts.append(Text(f"error ({r.failed_phase}): {r.error}", style="red"))
    for line in r.rollback:
        parts.append(Text(f"  rollback: {line}", style="yellow"))
    return Group(*parts)
