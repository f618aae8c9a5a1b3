"""The migration report: what ``--json FILE`` writes, one per migration.

Times are seconds since the migration started; sizes are bytes; rates are per
second. ``integrity`` values are ``verified``, ``failed``, ``unverified`` (it could not be
checked: never a pass in disguise) or, for the disk of a VM without disks, ``none``.
``result`` is ``succeeded`` (verified and committed: the source copy removed), ``unverified``
(the VM runs on the destination, a check could not be made, the source copy is kept paused),
``failed`` (the VM runs on the destination, a check failed or an error came after the resume,
the source copy is kept paused) or ``rolled_back`` (the VM runs on the source only).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Verdict = Literal["verified", "failed", "unverified", "none"]


class Endpoint(BaseModel):
    vcenter: str
    host: str
    datastore: str


class PhaseSpan(BaseModel):
    name: str
    start_s: float
    end_s: float


class Round(BaseModel):
    n: int
    start_s: float
    end_s: float
    dirty_rate_pps: int            # pages/s dirtied, as QEMU measured it in this round
    transferred_bytes: int         # RAM bytes sent during the round
    remaining_bytes: int           # RAM bytes still dirty at the round's start
    throttle_pct: int              # auto-converge CPU throttle in force
    throughput_bps: float          # RAM bytes/s sent during the round
    stun_pct: float = 0.0          # SDPS: share of each slice the vCPUs were stunned at the round's end
    downtime_limit_ms: int | None = None   # the downtime limit in force during the round
    decisions: list[str] = Field(default_factory=list)   # what the controller did at the round's end


class Decision(BaseModel):
    """One action of the convergence controller (or of SDPS in the source host agent)."""

    round: int                     # the round at whose end it was taken (0: at the start)
    t_s: float                     # seconds since the migration started
    action: str                    # throttle | stun | downtime-limit | sdps | postcopy | postcopy-pause |
    #                                postcopy-recover | abort
    value: float | None = None     # throttle/stun %, downtime limit ms
    detail: str = ""


class Downtime(BaseModel):
    reported: float | None         # QEMU's downtime (ms)
    observed: float | None         # the heartbeat outage across the switchover, in sequence numbers (ms)
    observed_naive: float | None = None   # the largest raw packet gap there (the rule before sequence numbers)
    # from the source QEMU's stop (its src-downtime-start checkpoint) to the guest resumed on the destination, on
    # one clock: what libvirt calls its downtime (QEMU's own figure ends when the source has sent its last byte)
    stop_to_resume: float | None = None
    # how much longer (ms; negative: shorter) the heartbeats' way from the VM to the observer took after the move
    # than before it (integrity.path_delay_change): a site-A observer hearing a VM moved to site B hears it about
    # the link's one-way delay later, which the outage includes; ``observed - path_change`` leaves it out
    path_change: float | None = None


class Stalls(BaseModel):
    max: float | None = None       # longest heartbeat gap during pre-copy (ms)
    total: float | None = None     # sum of pre-copy gaps above the threshold (ms)
    threshold_ms: float = 20.0
    after_resume_max: float | None = None   # longest gap after the resume (post-copy page faults), ms


class Postcopy(BaseModel):
    requested_s: float | None = None      # migrate-start-postcopy sent
    destination_running_s: float | None = None
    completed_s: float | None = None      # every page on the destination
    pauses: int = 0                       # channel failures during post-copy (postcopy-paused)
    recoveries: int = 0                   # ... reconnected with migrate-recover / resume


class Bytes(BaseModel):
    disk: int = 0                  # bytes the mirror processed (block job progress: the whole virtual disk)
    memory: int = 0                # RAM bytes migration transferred
    wire: int | None = None        # bytes the source sent on its vMotion interface, disk sync to completion


class Integrity(BaseModel):
    memory: Verdict = "unverified"
    disk: Verdict = "unverified"
    guest_running: bool = False
    details: list[str] = Field(default_factory=list)


class Switchover(BaseModel):
    """CLOCK_MONOTONIC instants (seconds since start) of the switchover, as each agent saw them."""

    source_paused_s: float | None = None
    mirror_done_s: float | None = None
    continued_s: float | None = None
    completed_s: float | None = None
    destination_resumed_s: float | None = None
    destination_nbd_stopped_s: float | None = None   # the destination agent stopped its NBD server
    destination_bitmaps_s: float | None = None       # ... and put the written-since-resume bitmaps on (then cont)
    heartbeat_gap_start_s: float | None = None    # last heartbeat before the switchover arrived
    heartbeat_gap_end_s: float | None = None      # first heartbeat after it arrived
    # QEMU's own checkpoints (its vmstate_downtime_checkpoint trace), both sides, seconds since start:
    # src-downtime-start, src-vm-stopped, src-iterable-saved, src-non-iterable-saved,
    # dst-precopy-loadvm-completed, dst-precopy-bh-enter, dst-precopy-bh-announced, ...
    qemu: dict[str, float] = Field(default_factory=dict)


class MigrationReport(BaseModel):
    vm: str
    source: Endpoint
    destination: Endpoint
    result: Literal["succeeded", "unverified", "failed", "rolled_back"]
    phases: list[PhaseSpan]
    rounds: list[Round]
    downtime_ms: Downtime
    stalls_ms: Stalls
    bytes: Bytes
    integrity: Integrity
    streams: int
    converge: str
    bandwidth_bps: int | None
    link_bandwidth_bps: int | None
    total_s: float
    failed_phase: str | None = None
    error: str | None
    rollback: list[str] = Field(default_factory=list)
    switchover: Switchover = Field(default_factory=Switchover)
    started_at: str                # wall-clock ISO time
    allow_postcopy: bool = False
    completion_timeout_s: float | None = None
    decisions: list[Decision] = Field(default_factory=list)
    postcopy: Postcopy | None = None      # set when the move switched to post-copy
    source_kept: bool = False             # the source QEMU (paused) and its disks are still on the source host
    accepted_unverified: bool = False     # committed unverified because the caller said so
    # every clock the move read, as an offset from the engine's (testbed.migration.clock): source and destination
    # agents, observer; {offset_s, uncertainty_s, rtt_s}. All instants in this report are the engine's.
    clocks: dict[str, dict[str, float]] = Field(default_factory=dict)
    # how quiet the machine was while the move ran (testbed.lab.quality): load at start and end, the highest
    # 1-minute load, CPU steal %, and "loaded" when the load rose above 1.5 per CPU (retake such numbers)
    machine: dict[str, Any] = Field(default_factory=dict)
