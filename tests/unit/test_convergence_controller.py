"""The convergence controller's decisions, round by round (no QEMU: the rates are given)."""

from __future__ import annotations

import pytest

from testbed.errors import InputError
from testbed.migration.convergence import (
    Controller,
    ConvergenceSettings,
    RoundStats,
    completion_timeout_s,
    normalize,
)

MB = 1e6
MiB = 2**20


def ctl(mode: str, allow_postcopy: bool = False, **kw: object) -> Controller:
    return Controller(mode, ConvergenceSettings(**kw), downtime_limit_ms=100,  # type: ignore[arg-type]
                      allow_postcopy=allow_postcopy, max_throttle_pct=90, timeout_s=120)


def rnd(n: int, dirty: float, send: float, remaining: int, stun: float = 0.0, elapsed: float | None = None
        ) -> RoundStats:
    return RoundStats(n=n, elapsed_s=elapsed if elapsed is not None else 2.0 * n, dirty_bps=dirty, send_bps=send,
                      remaining_bytes=remaining, throttle_pct=0, stun_pct=stun)


def test_mode_names_and_aliases() -> None:
    assert normalize("auto") == "auto-converge" and normalize("adaptive") == "adaptive"
    with pytest.raises(InputError, match="unknown mode"):
        normalize("fast")


def test_completion_timeout_is_per_gib_with_a_floor() -> None:
    s = ConvergenceSettings()
    assert completion_timeout_s(512 * MiB, s) == 120.0
    assert completion_timeout_s(64 * MiB, s) == 60.0
    assert completion_timeout_s(4 * 2**30, s) == 960.0


def test_start_settings_per_mode() -> None:
    assert ctl("auto").auto_converge and not ctl("auto").postcopy_capable
    assert ctl("sdps").start_sdps() is not None and ctl("adaptive").start_sdps() is not None
    assert ctl("auto").start_sdps() is None
    assert ctl("postcopy").postcopy_capable and ctl("postcopy").start_sdps() is None
    assert not ctl("adaptive").postcopy_capable and ctl("adaptive", allow_postcopy=True).postcopy_capable


def test_adaptive_stuns_first_then_steps_downtime_only_at_the_stun_ceiling() -> None:
    c = ctl("adaptive")
    # SDPS from the start (the agent stuns only as much as the rates demand), not a longer downtime
    assert c.start_sdps() is not None
    assert c.on_round(rnd(1, 120 * MB, 60 * MB, 200 * MiB)) == []
    # the dirty set does not shrink, SDPS not at its ceiling yet: still no downtime step
    assert c.on_round(rnd(2, 60 * MB, 60 * MB, 200 * MiB, stun=50)) == []
    assert c.on_round(rnd(3, 60 * MB, 60 * MB, 200 * MiB, stun=80)) == []
    # at the ceiling and still stuck: the downtime limit goes up one step (100 -> 200 ms of 4 steps to 500)
    acts = c.on_round(rnd(4, 60 * MB, 60 * MB, 200 * MiB, stun=95))
    assert [(a.kind, a.value) for a in acts] == [("downtime-limit", 200)]


def test_adaptive_quiet_guest_gets_no_decision() -> None:
    c = ctl("adaptive", allow_postcopy=True)
    for i, rem in enumerate((100 * MiB, 30 * MiB, 8 * MiB), 1):
        assert c.on_round(rnd(i, 20 * MB, 60 * MB, rem)) == []


def test_adaptive_goes_post_copy_only_when_allowed() -> None:
    for allowed in (False, True):
        c = ctl("adaptive", allow_postcopy=allowed)
        kinds: list[str] = []
        for i in range(1, 12):
            kinds += [a.kind for a in c.on_round(rnd(i, 200 * MB, 60 * MB, 64 * MiB, stun=95))]
        assert ("postcopy" in kinds) is allowed, kinds
        assert kinds.count("downtime-limit") == 4
    assert ctl("adaptive").on_timeout() is None
    assert ctl("adaptive", allow_postcopy=True).on_timeout() is not None


def test_postcopy_mode_switches_once_precopy_stops_making_progress() -> None:
    c = ctl("postcopy")
    assert c.on_round(rnd(1, 150 * MB, 60 * MB, 300 * MiB)) == []      # the first pass: no verdict yet
    acts = c.on_round(rnd(2, 150 * MB, 60 * MB, 250 * MiB))
    assert [a.kind for a in acts] == ["postcopy"] and c.postcopy_started
    assert c.on_round(rnd(3, 150 * MB, 60 * MB, 250 * MiB)) == []      # only once


def test_give_up_message_names_what_was_tried_and_the_rates() -> None:
    c = ctl("adaptive", sdps_max_stun_pct=5)
    c.on_round(rnd(1, 120 * MB, 30 * MB, 64 * MiB))
    c.on_round(rnd(2, 120 * MB, 30 * MB, 64 * MiB, stun=5))
    c.on_round(rnd(3, 120 * MB, 30 * MB, 64 * MiB, stun=5))
    msg = c.give_up_message(120 * MB, 30 * MB)
    assert "completion timeout of 120 s" in msg and "dirties 120.0 MB/s, the link sends 30.0 MB/s" in msg
    assert "SDPS (stun reached 5% of 5% allowed)" in msg and "downtime limit stepped 100 -> 200 ms" in msg
    assert "post-copy not allowed" in msg
    assert "auto-converge (throttle reached 0% of 90% allowed)" in ctl("auto").give_up_message(1, 1)
