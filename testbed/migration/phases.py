"""The migration's phases: an Enum, and the legal transitions in one place.

    PRECHECK -> DISK_SYNC -> MEMORY_PRECOPY -> SWITCHOVER -> VERIFY -> COMMIT -> DONE
    any phase before COMMIT -> ROLLBACK -> ROLLED_BACK
    SWITCHOVER or VERIFY -> FAILED once the destination runs the guest (an integrity check failed, or
    an error after the resume): the source is kept paused, nothing is committed
    MEMORY_PRECOPY or ROLLBACK -> FAILED when a rollback finds that the source handed the guest over by
    itself (its migration completed) and the destination runs it, or cannot be stopped: the source stays paused
    VERIFY -> UNVERIFIED: the destination runs the guest, nothing failed, but memory or a disk could not
    be checked: the source is kept paused until the user discards it (or the caller accepted unverified)
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from testbed.errors import PhaseError


class Phase(enum.Enum):
    CREATED = "created"
    PRECHECK = "precheck"
    DISK_SYNC = "disk-sync"
    MEMORY_PRECOPY = "memory-precopy"
    SWITCHOVER = "switchover"
    VERIFY = "verify"
    COMMIT = "commit"
    DONE = "done"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"
    UNVERIFIED = "unverified"


_ROLLBACK_FROM = {Phase.PRECHECK, Phase.DISK_SYNC, Phase.MEMORY_PRECOPY, Phase.SWITCHOVER, Phase.VERIFY}

TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.CREATED: frozenset({Phase.PRECHECK}),
    Phase.PRECHECK: frozenset({Phase.DISK_SYNC, Phase.ROLLBACK}),
    Phase.DISK_SYNC: frozenset({Phase.MEMORY_PRECOPY, Phase.ROLLBACK}),
    Phase.MEMORY_PRECOPY: frozenset({Phase.SWITCHOVER, Phase.ROLLBACK, Phase.FAILED}),
    Phase.SWITCHOVER: frozenset({Phase.VERIFY, Phase.ROLLBACK, Phase.FAILED}),
    Phase.VERIFY: frozenset({Phase.COMMIT, Phase.FAILED, Phase.UNVERIFIED, Phase.ROLLBACK}),
    Phase.COMMIT: frozenset({Phase.DONE}),
    Phase.ROLLBACK: frozenset({Phase.ROLLED_BACK, Phase.FAILED}),
    Phase.DONE: frozenset(), Phase.ROLLED_BACK: frozenset(), Phase.FAILED: frozenset(), Phase.UNVERIFIED: frozenset(),
}
assert all(Phase.ROLLBACK in TRANSITIONS[p] for p in _ROLLBACK_FROM)


@dataclass
class PhaseRecord:
    phase: Phase
    start_s: float
    end_s: float | None = None


@dataclass
class PhaseMachine:
    """Tracks the current phase and the timeline (seconds since ``t0``, CLOCK_MONOTONIC)."""

    t0: float = field(default_factory=time.monotonic)
    phase: Phase = Phase.CREATED
    timeline: list[PhaseRecord] = field(default_factory=list)
    failed_in: Phase | None = None

    def enter(self, new: Phase, at: float | None = None) -> None:
        if new not in TRANSITIONS[self.phase]:
            raise PhaseError(self.phase, new)
        now = (at if at is not None else time.monotonic()) - self.t0
        if self.timeline and self.timeline[-1].end_s is None:
            self.timeline[-1].end_s = now
        if new is Phase.ROLLBACK:
            self.failed_in = self.phase
        self.phase = new
        terminal = not TRANSITIONS[new]
        self.timeline.append(PhaseRecord(new, now, now if terminal else None))

    @property
    def sequence(self) -> list[Phase]:
        return [r.phase for r in self.timeline]
