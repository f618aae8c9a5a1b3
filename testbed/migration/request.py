"""What a move is asked to do (``MigrationRequest``: the VM, its two places, the knobs), and ``Progress``,
what the live display shows while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from testbed.guest.workload import Workload
from testbed.hosts.agent import Agent
from testbed.hosts.base import Host
from testbed.migration.convergence import ConvergeMode, ConvergenceSettings, completion_timeout_s
from testbed.migration.phases import Phase
from testbed.qemu.spec import VmSpec

DISK_SYNC_MIN_TIMEOUT_S = 300.0
# what a move takes besides its disk copy and pre-copy, at most: switchover (60 s), verification (the disks'
# digests: 300 s), rollback or commit calls, and some slack
MOVE_MARGIN_S = 600.0
POSTCOPY_RECOVERY_TIMEOUT_S = 120.0


def disk_sync_timeout_s(spec: VmSpec, given: float | None, rate_bps: int | None) -> float:
    """How long the disk copy may take: ``given``, else three times the disks' size at ``rate_bps``, at least
    DISK_SYNC_MIN_TIMEOUT_S."""
    if given is not None:
        return given
    size = sum(d.size_bytes for d in spec.disks)
    return max(DISK_SYNC_MIN_TIMEOUT_S, 3 * size / rate_bps) if rate_bps else DISK_SYNC_MIN_TIMEOUT_S


def move_time_limit_s(spec: VmSpec, *, completion_timeout: float | None = None, rate_bps: int | None = None,
                      disk_sync_timeout: float | None = None, allow_postcopy: bool = False,
                      convergence: ConvergenceSettings | None = None) -> float:
    """The longest a move of ``spec`` may take with these settings before the engine itself gives up: its disk
    copy's limit, its pre-copy's completion timeout, a post-copy's push and recovery, and MOVE_MARGIN_S. What a
    cross-vCenter move's ticket is sized to (testbed.vcenter.admission)."""
    total = disk_sync_timeout_s(spec, disk_sync_timeout, rate_bps)
    total += completion_timeout or completion_timeout_s(spec.memory_bytes, convergence or ConvergenceSettings())
    if allow_postcopy:
        total += POSTCOPY_RECOVERY_TIMEOUT_S + (3 * spec.memory_bytes / rate_bps if rate_bps else 300.0)
    return total + MOVE_MARGIN_S


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
    postcopy_recovery_timeout_s: float = POSTCOPY_RECOVERY_TIMEOUT_S   # a broken post-copy: reconnect within this
    accept_unverified: bool = False        # commit (remove the source copy) although a check could not be made
    # Open connections to the source's and destination's agents that the caller keeps (a management plane
    # holds its host connections, as a vCenter does); None: the engine connects to both and closes them.
    agents: tuple[Agent, Agent] | None = None
