"""Did the VM arrive whole? The checks every engine's move is judged by (ours and the libvirt baseline).

The guest's own checks come through the heartbeat observer: the built-in guest's agent
verifies its memory pattern and its disk block ring and says so in every heartbeat
(docs/guest-agent.md). Disks are compared per MiB (``disk.digest`` of the host agents):
the source image, frozen at the switchover, against the destination's, which the guest
may already have written to. The same heartbeats give the downtime the VM's users felt
and the stalls during pre-copy.

Observed downtime (``outage``) is counted in sequence numbers, not in raw packet gaps: the
outage runs from the last heartbeat that brought news before the switchover (the highest
sequence number so far) to the first one after it with a higher number. A duplicate of the
last pre-pause heartbeat arriving after the resume, or an old packet arriving late, is no
news, so it cannot split the outage in two (the earlier rule, the largest single gap, then
reported only the larger half).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from testbed.guest.heartbeat import FLAG_MEM_VIOLATION
from testbed.guest.workload import IDLE_WSS, Workload
from testbed.lab import observer as obs
from testbed.migration.report import Integrity, Stalls

PAGE = 4096


def verdict(integ: Integrity) -> Literal["verified", "unverified", "failed"]:
    """The rule every move is judged by, in one place (docs/migration.md, "Verdicts").

    ``failed``: a check failed, or the guest does not run on the destination. ``verified``: memory verified and
    every disk verified (or no disks: ``none``). Anything else is ``unverified``: a check could not be made.
    Only ``verified`` lets the source copy go without the user's word.
    """
    if "failed" in (integ.memory, integ.disk) or not integ.guest_running:
        return "failed"
    if integ.memory == "verified" and integ.disk in ("verified", "none"):
        return "verified"
    return "unverified"


async def heartbeat_before(sock: Path, vm: str, paused_s: float) -> dict[str, Any] | None:
    """The last heartbeat in the 2 s before the source paused (CLOCK_MONOTONIC); None if none."""
    before = await obs.query(sock, {"op": "stats", "vm": vm, "since_s": paused_s - 2.0, "until_s": paused_s})
    return before["last"] if before["count"] else None


async def guest_back(sock: Path, vm: str, resumed_s: float, timeout_s: float = 3.0) -> bool:
    """Wait until the guest's first heartbeat after ``resumed_s`` (at most ``timeout_s``); whether it came.

    Checks that load the hosts (disk digests) start only then, so they do not lengthen the downtime they measure.
    """
    return await obs.first_heartbeat(sock, vm, since_s=resumed_s, timeout_s=timeout_s) is not None


def outage(samples: Sequence[Sequence[float]], paused_s: float,
           resumed_s: float) -> dict[str, Any] | None:
    """The outage the VM's users felt across the switchover, from (receive time, seq, ...) in receive order.

    A heartbeat is news when its sequence number is above every one received before it; duplicates and
    reordered (older) packets are ignored. The outage is the interval between the two consecutive pieces of news
    that holds the middle of [``paused_s``, ``resumed_s``] (a heartbeat sent just before the pause may arrive just
    after it, so the edges cannot decide); None when there is no news on one side of it (a guest that stayed
    silent or restarted). ``naive_ms`` is the largest raw packet gap overlapping the window: the old rule.
    """
    news: list[tuple[float, int]] = []
    ignored = 0
    top = -1
    for t, seq, *_ in samples:
        if seq > top:
            news.append((float(t), int(seq)))
            top = int(seq)
        else:
            ignored += 1
    mid = (paused_s + resumed_s) / 2
    best: dict[str, Any] | None = None
    for (t0, s0), (t1, s1) in zip(news, news[1:], strict=False):
        if t0 <= mid < t1:
            best = {"start_s": t0, "end_s": t1, "seq_before": s0, "seq_after": s1}
            break
    if best is None:
        return None
    times = [float(x[0]) for x in samples]
    naive = max((b - a for a, b in zip(times, times[1:], strict=False) if b >= paused_s and a <= resumed_s),
                default=0.0)
    best.update(gap_ms=round((best["end_s"] - best["start_s"]) * 1000, 3), lost=best["seq_after"] -
                best["seq_before"] - 1, ignored=ignored, naive_ms=round(naive * 1000, 3))
    return best


PATH_WINDOW_S = 1.0      # heartbeats on each side of the outage whose fastest one gives the path's delay


def path_delay_change(samples: Sequence[Sequence[float]], out: dict[str, Any], frozen_s: float,
                      window_s: float = PATH_WINDOW_S) -> dict[str, Any] | None:
    """How much the heartbeat path's one-way delay changed across the move (ms), from the guest's own send times.

    ``samples``: (receive time, seq, guest clock ns) in receive order; ``out``: ``outage`` of them; ``frozen_s``:
    how long the guest's clock stood still (the source's stop to the destination's resume, on one clock).

    For each heartbeat, receive time minus the guest's send time (its CLOCK_MONOTONIC) is the path's one-way delay
    plus a constant (the two clocks' origins). QEMU stops the guest's clocks with its vCPUs and carries them in the
    migration, so after the move that difference has grown by ``frozen_s`` plus the change in the path's delay
    (a site-A observer hearing a VM now at site B: about the link's one-way delay more). The smallest difference
    in ``window_s`` of news on each side stands for the path itself (its fastest packet, no queueing). The result
    reads an observed downtime both ways: the outage minus ``change_ms`` is what a user whose path to the VM did
    not change would have felt. None without guest send times (heartbeats of an older agent) on either side.
    """
    before: list[float] = []
    after: list[float] = []
    top = -1
    for t, seq, gns, *_ in samples:
        if seq <= top or not gns:
            continue
        top = int(seq)
        d = float(t) - gns / 1e9
        if out["start_s"] - window_s <= t <= out["start_s"]:
            before.append(d)
        elif out["end_s"] <= t <= out["end_s"] + window_s:
            after.append(d)
    if not before or not after:
        return None
    change = (min(after) - min(before) - frozen_s) * 1000
    return {"change_ms": round(change, 3), "before_n": len(before), "after_n": len(after)}


@dataclass
class GuestTimes:
    """What the heartbeats say about the move: observed downtime and stalls (ms), the gap's instants."""

    observed_ms: float | None = None
    naive_ms: float | None = None       # the largest raw packet gap (the rule before sequence numbers)
    path_change_ms: float | None = None   # the heartbeat path's one-way delay after the move minus before it
    gap_start_s: float | None = None    # CLOCK_MONOTONIC
    gap_end_s: float | None = None
    stalls: Stalls = field(default_factory=Stalls)


async def check_guest(sock: Path, vm: str, hb0: dict[str, Any] | None, *, precopy_s: float, paused_s: float,
                      resumed_s: float, workload: Workload, integ: Integrity, frozen_s: float | None = None,
                      threshold_ms: float = 20.0, verify_timeout_s: float = 60.0) -> GuestTimes:
    """Judge the guest after the move (``integ`` is updated); returns the heartbeat figures.

    ``hb0``: ``heartbeat_before``; ``precopy_s``, ``paused_s``, ``resumed_s``: CLOCK_MONOTONIC instants of the
    memory pre-copy's start, the source's pause and the destination's resume; ``frozen_s``: from the source QEMU's
    stop to that resume (``resumed_s - paused_s`` if not given), for ``path_delay_change``. Memory is verified
    when the guest has re-verified its whole working set after the resume without an error.
    """
    times = GuestTimes(stalls=Stalls(threshold_ms=threshold_ms))
    if hb0 is None:
        integ.details.append("no heartbeat in the 2 s before the switchover: the guest was already silent")
        integ.memory = "failed"
        return times
    around = await obs.query(sock, {"op": "stats", "vm": vm, "since_s": precopy_s - 0.5, "until_s": None,
                                    "gap_threshold_ms": threshold_ms})
    wss_pages = (workload.mem_wss_bytes if workload.mem_rate_bps else IDLE_WSS) // PAGE
    deadline = time.monotonic() + verify_timeout_s
    verified_at_resume: int | None = None
    while True:
        after = await obs.query(sock, {"op": "stats", "vm": vm, "since_s": resumed_s})
        last = after["last"] if after["count"] else None
        # "<", not "<=": the last heartbeat before the pause can arrive a second time after the resume
        # (seen at 0 ms RTT, idle guest: seq 3080 before and after); a restarted guest starts again from 1.
        if last is not None and last["seq"] < hb0["seq"]:
            integ.details.append(f"the guest restarted after the move (heartbeat seq {last['seq']} "
                                 f"< {hb0['seq']} before it)")
            integ.memory = "failed"
            break
        if last is not None:
            integ.guest_running = True
            if verified_at_resume is None:   # the guest's count at its first heartbeat after the resume
                verified_at_resume = (after.get("first") or last)["mem_pages_verified"]
            if last["mem_errors"] > hb0["mem_errors"] or last["flags"] & FLAG_MEM_VIOLATION:
                integ.memory = "failed"
                integ.details.append(f"the guest agent found {last['mem_errors']} bad memory pages after the move")
                break
            if last["disk_errors"] > hb0["disk_errors"]:
                integ.disk = "failed"
                integ.details.append(f"the guest agent found {last['disk_errors']} bad disk blocks after the move")
            if last["mem_pages_verified"] - verified_at_resume >= wss_pages:
                integ.memory = "verified"
                integ.details.append(f"memory: the guest verified all {wss_pages} working-set pages after "
                                     f"the move, 0 errors")
                break
        if time.monotonic() > deadline:
            if last is None:
                integ.details.append(f"no heartbeat from the guest within {verify_timeout_s:.0f} s after it resumed")
                integ.memory = "failed"
            else:
                integ.details.append(f"memory unverified: the guest did not finish a verification pass in "
                                     f"{verify_timeout_s:.0f} s")
            break
        await asyncio.sleep(0.2)
    # the outage across the switchover, in sequence numbers, is what a user of the VM felt
    window = await obs.query(sock, {"op": "samples", "vm": vm, "since_s": paused_s - 2.0,
                                    "until_s": resumed_s + 5.0})
    out = outage(window["samples"], paused_s, resumed_s)
    if out is not None:
        times.observed_ms, times.naive_ms = out["gap_ms"], out["naive_ms"]
        times.gap_start_s, times.gap_end_s = out["start_s"], out["end_s"]
        path = path_delay_change(window["samples"], out, frozen_s if frozen_s is not None else resumed_s - paused_s)
        times.path_change_ms = path["change_ms"] if path else None
    pre = [g for g in around["gaps"] if g["end_s"] <= paused_s]
    times.stalls.max = round(max((g["gap_ms"] for g in pre), default=0.0), 2)
    times.stalls.total = round(sum(g["gap_ms"] for g in pre), 2)
    post = [g for g in around["gaps"] if g["start_s"] >= resumed_s]
    times.stalls.after_resume_max = round(max((g["gap_ms"] for g in post), default=0.0), 2)
    return times


def judge_disk(file: str, src: dict[str, Any], dst: dict[str, Any], *, builtin_guest: bool, workload: Workload,
               hb0: dict[str, Any] | None, details: list[str]) -> str:
    """Source (frozen at the switchover) vs destination (read at one instant after the resume) ``disk.digest``
    results: a verdict.

    ``dst["written_chunks"]`` (when the destination tracked it): the chunks the guest wrote between its resume
    and that instant. Every difference must lie in them, for any guest, the user's own too; a difference
    elsewhere is ``failed``. A built-in guest whose disk workload is off writes nothing, so any difference is
    ``failed``. The built-in disk-writing guest's block ring is a second opinion (valid rings, nothing lost).
    ``unverified`` only when a difference cannot be judged: no record of the guest's writes (an engine or host
    that cannot track them) for a guest that may write anywhere.
    """
    if src["size_bytes"] != dst["size_bytes"]:
        details.append(f"disk {file}: sizes differ ({src['size_bytes']} vs {dst['size_bytes']})")
        return "failed"
    diff = [i for i, (x, y) in enumerate(zip(src["chunks"], dst["chunks"], strict=True)) if x != y]
    if not diff:
        details.append(f"disk {file}: source and destination identical ({len(src['chunks'])} MiB compared)")
        return "verified"
    if builtin_guest and not workload.disk_rate_bps:
        details.append(f"disk {file}: {len(diff)} MiB differ (first at {diff[0]} MiB) although the guest writes "
                       "nothing to its disk (disk workload off): the destination copy is not the source's")
        return "failed"
    written = dst.get("written_chunks")
    if written is not None:
        stray = sorted(set(diff) - set(written))
        if stray:
            details.append(f"disk {file}: {len(stray)} MiB differ where the guest did not write after the resume "
                           f"(first at {stray[0]} MiB; it wrote {len(written)} MiB): the destination copy is not "
                           "the source's")
            return "failed"
    sr, dr = src.get("ring"), dst.get("ring")
    if not (builtin_guest and sr and dr):
        if written is not None:
            details.append(f"disk {file}: {len(diff)} MiB differ, all where the guest wrote after the resume "
                           f"(dirty bitmap since the resume: {len(written)} MiB written)")
            return "verified"
        details.append(f"disk {file}: {len(diff)} MiB differ and the guest wrote after the move; "
                       "cannot tell them apart without a record of its writes")
        return "unverified"
    ring_end_chunk = (dr["nblocks"] * 4096 - 1) // src["chunk_bytes"]
    outside = [i for i in diff if i > ring_end_chunk]
    problems = []
    if outside:
        problems.append(f"{len(outside)} MiB differ outside the guest's block ring (first at {outside[0]} MiB)")
    for side, r in (("source", sr), ("destination", dr)):
        if r["bad_blocks"] or r["holes"]:
            problems.append(f"{side} ring has {r['bad_blocks']} bad blocks and {r['holes']} missing "
                            f"sequence numbers (first: {r['bad'][:1]})")
    if dr["max_seq"] < sr["max_seq"]:
        problems.append(f"destination ring ends at seq {dr['max_seq']}, before the source's {sr['max_seq']}")
    if hb0 and sr["max_seq"] < hb0["disk_seq"]:
        problems.append(f"the source image lacks writes the guest had completed (seq {sr['max_seq']} < "
                        f"{hb0['disk_seq']})")
    if problems:
        details.append(f"disk {file}: " + "; ".join(problems))
        return "failed"
    details.append(f"disk {file}: {len(diff)} MiB differ, all inside the guest's block ring and explained by "
                   f"{dr['max_seq'] - sr['max_seq']} blocks written after the move; both rings valid"
                   + ("; all where the guest wrote after the resume" if written is not None else ""))
    return "verified"
