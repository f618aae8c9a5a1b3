"""The convergence controller: what the engine does, round by round, so a pre-copy ends.

Modes (``--converge``):

- ``off``: nothing; the completion timeout still applies.
- ``auto-converge`` (alias ``auto``): QEMU's auto-converge, ceiling ``max_throttle_pct``.
- ``sdps``: Stun During Page Send from the source host agent (``testbed.hostd.sdps``): the vCPUs
  are stunned in millisecond slices, the share chosen each round from the dirty and send rates.
- ``postcopy``: pre-copy until it stops making progress, then ``migrate-start-postcopy``.
- ``adaptive``: SDPS from the start (it stuns only when a round shows the guest outpacing the
  link; QEMU's own dirty rate is an underestimate during the first pass, so waiting for the engine
  to see it would cost a whole pass); stepped downtime limit (Nova's
  ``live_migration_downtime_steps``) while the dirty set stops shrinking with SDPS at its ceiling;
  post-copy (if allowed) when neither helps or half the completion timeout has gone.

Every mode has a completion timeout (per GiB of guest RAM, like Nova's and KubeVirt's): when it
passes, ``postcopy`` and ``adaptive`` (if allowed) switch to post-copy; otherwise the engine aborts
and rolls back with ``give_up_message()``. The controller only decides; the engine applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from testbed.errors import InputError

ConvergeMode = Literal["auto-converge", "auto", "sdps", "postcopy", "adaptive", "off"]
MODES: tuple[str, ...] = ("auto-converge", "sdps", "postcopy", "adaptive", "off")
DEFAULT_MODE = "adaptive"


def normalize(mode: str) -> str:
    m = {"auto": "auto-converge", "autoconverge": "auto-converge", "post-copy": "postcopy"}.get(mode, mode)
    if m not in MODES:
        raise InputError(f"--converge {mode!r}: unknown mode", hint=f"use one of {', '.join(MODES)} (auto = "
                                                                     "auto-converge)")
    return m


class ConvergenceSettings(BaseModel):
    """The knobs, with the values the benchmarks were run with (docs/benchmarks.md)."""

    model_config = ConfigDict(frozen=True)
    completion_timeout_per_gib_s: float = Field(default=240.0, gt=0)   # of guest RAM (KubeVirt: 150 s/GiB)
    completion_timeout_min_s: float = Field(default=60.0, gt=0)
    downtime_max_ms: int = Field(default=500, gt=0)       # adaptive: the last downtime step (Nova: 500 ms)
    downtime_steps: int = Field(default=4, ge=1)          # adaptive: steps from the request's limit to the max
    # 90 %: a guest left 10 % of its CPU needs ~40 ms to get a heartbeat out (measured, docs/benchmarks.md)
    sdps_max_stun_pct: int = Field(default=90, ge=1, le=99)
    sdps_slice_ms: int = Field(default=10, ge=2, le=1000)   # CFS period / freezer grid
    sdps_target_ratio: float = Field(default=0.5, gt=0, lt=1)
    sdps_method: Literal["cfs", "freezer", "qemu-throttle"] = "cfs"
    stalled_rounds: int = Field(default=3, ge=1)          # rounds without the dirty set shrinking = no progress
    postcopy_at_fraction: float = Field(default=0.5, gt=0, le=1)   # adaptive: post-copy by this share of the timeout

    def sdps_agent_settings(self) -> dict[str, object]:
        return {"max_stun_pct": self.sdps_max_stun_pct, "period_ms": self.sdps_slice_ms,
                "target_ratio": self.sdps_target_ratio, "method": self.sdps_method}


def completion_timeout_s(memory_bytes: int, settings: ConvergenceSettings) -> float:
    return max(settings.completion_timeout_min_s, settings.completion_timeout_per_gib_s * memory_bytes / 2**30)


@dataclass(frozen=True)
class RoundStats:
    n: int                    # the round that just ended (1-based)
    elapsed_s: float          # since the memory pre-copy started
    dirty_bps: float
    send_bps: float
    remaining_bytes: int      # dirty at the start of the next round
    throttle_pct: int
    stun_pct: float


@dataclass(frozen=True)
class Action:
    kind: Literal["downtime-limit", "postcopy"]
    value: float | None
    why: str


@dataclass
class Controller:
    mode: str
    settings: ConvergenceSettings
    downtime_limit_ms: int
    allow_postcopy: bool
    max_throttle_pct: int
    timeout_s: float
    sdps_on: bool = False
    postcopy_started: bool = False
    downtime_now_ms: int = 0
    _best_remaining: int | None = None
    _stalled: int = 0
    _step: int = 0
    _max_stun: float = 0.0
    _max_throttle: int = 0

    def __post_init__(self) -> None:
        self.mode = normalize(self.mode)
        self.downtime_now_ms = self.downtime_limit_ms
        if self.mode in ("sdps", "adaptive"):
            self.sdps_on = True

    # --- what the migration starts with -----------------------------------------------------
    @property
    def auto_converge(self) -> bool:
        return self.mode == "auto-converge"

    @property
    def postcopy_capable(self) -> bool:
        return self.mode == "postcopy" or (self.mode == "adaptive" and self.allow_postcopy)

    def start_sdps(self) -> dict[str, object] | None:
        return self.settings.sdps_agent_settings() if self.sdps_on else None

    # --- each round ----------------------------------------------------------------------------
    def on_round(self, r: RoundStats) -> list[Action]:
        self._max_stun = max(self._max_stun, r.stun_pct)
        self._max_throttle = max(self._max_throttle, r.throttle_pct)
        if self._best_remaining is None or r.remaining_bytes < 0.9 * self._best_remaining:
            self._best_remaining = r.remaining_bytes
            self._stalled = 0
        else:
            self._stalled += 1
        if self.postcopy_started:
            return []
        s = self.settings
        acts: list[Action] = []
        outpaced = r.send_bps > 0 and r.dirty_bps >= 0.8 * r.send_bps
        if self.mode == "postcopy":
            if r.n >= 2 and (outpaced or self._stalled >= 1):
                acts.append(self._postcopy(f"pre-copy stopped making progress in round {r.n} (dirty "
                                           f"{r.dirty_bps / 1e6:.1f} MB/s vs send {r.send_bps / 1e6:.1f} MB/s)"))
            elif r.elapsed_s >= s.postcopy_at_fraction * self.timeout_s:
                acts.append(self._postcopy(f"{r.elapsed_s:.0f} s of pre-copy"))
        elif self.mode == "adaptive":
            if self._stalled >= 2 and self._step < s.downtime_steps and r.stun_pct >= s.sdps_max_stun_pct - 1:
                # only once SDPS is at its ceiling: a longer downtime is what users feel most
                self._step += 1
                lim = round(self.downtime_limit_ms + (s.downtime_max_ms - self.downtime_limit_ms)
                            * self._step / s.downtime_steps)
                self.downtime_now_ms = lim
                acts.append(Action("downtime-limit", lim, f"step {self._step}/{s.downtime_steps}: the dirty set "
                                   f"stopped shrinking ({r.remaining_bytes / 2**20:.0f} MiB left)"))
            if self.allow_postcopy and (
                    (self.sdps_on and self._step >= s.downtime_steps and self._stalled >= s.stalled_rounds)
                    or r.elapsed_s >= s.postcopy_at_fraction * self.timeout_s):
                acts.append(self._postcopy(f"SDPS and downtime steps did not converge after {r.elapsed_s:.0f} s"))
        return acts

    def on_timeout(self) -> Action | None:
        """The completion timeout passed: the fallback if one is allowed, else None (abort)."""
        if not self.postcopy_started and self.postcopy_capable:
            return self._postcopy(f"completion timeout ({self.timeout_s:.0f} s)")
        return None

    def _postcopy(self, why: str) -> Action:
        self.postcopy_started = True
        return Action("postcopy", None, why)

    def give_up_message(self, dirty_bps: float, send_bps: float) -> str:
        tried = {
            "off": ["no convergence control (--converge off)"],
            "auto-converge": [f"QEMU auto-converge (throttle reached {self._max_throttle}% of "
                              f"{self.max_throttle_pct}% allowed)"],
            "sdps": [f"SDPS (stun reached {self._max_stun:.0f}% of {self.settings.sdps_max_stun_pct}% allowed, "
                     f"{self.settings.sdps_slice_ms} ms slices)"],
            "postcopy": [],
            "adaptive": [f"SDPS (stun reached {self._max_stun:.0f}% of {self.settings.sdps_max_stun_pct}% allowed)"
                         if self.sdps_on else "SDPS not engaged (the guest never outpaced the link)",
                         f"downtime limit stepped {self.downtime_limit_ms} -> {self.downtime_now_ms} ms"
                         if self._step else "downtime limit not stepped (SDPS never reached its ceiling)"],
        }[self.mode]
        if not self.postcopy_capable:
            tried.append("post-copy not allowed" + (" (allow_postcopy is off)" if self.mode == "adaptive" else ""))
        return (f"pre-copy did not converge within the completion timeout of {self.timeout_s:.0f} s: the guest "
                f"dirties {dirty_bps / 1e6:.1f} MB/s, the link sends {send_bps / 1e6:.1f} MB/s; tried: "
                + "; ".join(tried) + ". Rolled back: the VM keeps running on the source. To move it, allow "
                "post-copy (--converge adaptive --allow-postcopy), raise the completion timeout, or give the "
                "vMotion link more bandwidth")
