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

import math
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
    # 99 %: the controller stuns only as far as the measured rates require (docs/migration.md)
    sdps_max_stun_pct: int = Field(default=99, ge=1, le=99)
    sdps_slice_ms: int = Field(default=10, ge=2, le=1000)   # CFS period / freezer grid
    sdps_stall_target_ms: int = Field(default=50, ge=5, le=1000)   # auto: no single stun longer than this
    sdps_target_ratio: float = Field(default=0.5, gt=0, lt=1)
    sdps_method: Literal["auto", "cfs", "freezer", "qemu-throttle"] = "auto"
    stalled_rounds: int = Field(default=3, ge=1)          # rounds without the dirty set shrinking = no progress
    postcopy_at_fraction: float = Field(default=0.5, gt=0, le=1)   # adaptive: post-copy by this share of the timeout

    def sdps_agent_settings(self) -> dict[str, object]:
        return {"max_stun_pct": self.sdps_max_stun_pct, "period_ms": self.sdps_slice_ms,
                "target_ratio": self.sdps_target_ratio, "method": self.sdps_method,
                "stall_target_ms": self.sdps_stall_target_ms}


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
    sdps_exhausted: bool = False   # the source agent measured: at its ceiling, still as fast as the link


@dataclass(frozen=True)
class Action:
    kind: Literal["downtime-limit", "postcopy", "abort"]
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
            acts += self._adaptive(r)
        return acts

    def _adaptive(self, r: RoundStats) -> list[Action]:
        """SDPS first; once the agent measured that stunning cannot bring the dirty rate under the send rate,
        at once: a downtime limit sized from the measured remaining bytes and the link, then post-copy (if
        allowed), then a clean abort; never an idle wait for the completion timeout."""
        s = self.settings
        late = r.elapsed_s >= s.postcopy_at_fraction * self.timeout_s
        if self.allow_postcopy and late:
            return [self._postcopy(f"{r.elapsed_s:.0f} s of pre-copy, half the completion timeout")]
        if not r.sdps_exhausted or r.send_bps <= 0:
            return []
        need_ms = math.ceil(r.remaining_bytes / r.send_bps * 1000 * 1.25)   # send what is left, 25 % margin
        if need_ms <= self.downtime_now_ms and self._stalled < s.stalled_rounds:
            return []          # the limit already allows the switchover: give QEMU the rounds to take it
        if need_ms <= s.downtime_max_ms and self.downtime_now_ms < s.downtime_max_ms:
            if need_ms > self.downtime_now_ms:
                lim, why = need_ms, (f"SDPS at its ceiling ({r.stun_pct:.0f}%) and the guest still dirties "
                                     f"{r.dirty_bps / 1e6:.1f} MB/s vs {r.send_bps / 1e6:.1f} MB/s sent: "
                                     f"{r.remaining_bytes / 2**20:.1f} MiB left need {need_ms} ms at this link "
                                     "(25 % margin)")
            else:
                lim, why = s.downtime_max_ms, (f"the switchover did not come at {need_ms} ms: the last step, "
                                               f"{s.downtime_max_ms} ms")
            self._step += 1
            self.downtime_now_ms = lim
            self._stalled = 0
            return [Action("downtime-limit", lim, why)]
        if self.allow_postcopy:
            return [self._postcopy(f"SDPS at its ceiling cannot slow the guest enough and "
                                   f"{r.remaining_bytes / 2**20:.1f} MiB would need {need_ms} ms of downtime "
                                   f"(at most {s.downtime_max_ms} ms)")]
        why = (f"pre-copy cannot converge: with SDPS at its ceiling ({r.stun_pct:.0f}% of each slice "
                        f"stunned) the guest still dirties {r.dirty_bps / 1e6:.1f} MB/s, the link sends "
                        f"{r.send_bps / 1e6:.1f} MB/s, and the {r.remaining_bytes / 2**20:.1f} MiB left would need "
                        f"{need_ms} ms of downtime (at most {s.downtime_max_ms} ms allowed); post-copy not allowed "
                        f"(allow_postcopy is off). Rolled back after {r.elapsed_s:.0f} s: the VM keeps running on "
                        "the source. To move it, allow post-copy (--converge adaptive --allow-postcopy), allow a "
                        "longer downtime, or give the vMotion link more bandwidth")
        return [Action("abort", None, why)]

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
                         if self._step else "downtime limit not stepped (SDPS never measured that it could "
                         "not slow the guest enough)"],
        }[self.mode]
        if not self.postcopy_capable:
            tried.append("post-copy not allowed" + (" (allow_postcopy is off)" if self.mode == "adaptive" else ""))
        return (f"pre-copy did not converge within the completion timeout of {self.timeout_s:.0f} s: the guest "
                f"dirties {dirty_bps / 1e6:.1f} MB/s, the link sends {send_bps / 1e6:.1f} MB/s; tried: "
                + "; ".join(tried) + ". Rolled back: the VM keeps running on the source. To move it, allow "
                "post-copy (--converge adaptive --allow-postcopy), raise the completion timeout, or give the "
                "vMotion link more bandwidth")
