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


def rnd(n: int, dirty: float, send: float, remaining: int, stun: float = 0.0, elapsed: float | None = None,
        exhausted: bool = False) -> RoundStats:
    return RoundStats(n=n, elapsed_s=elapsed if elapsed is not None else 2.0 * n, dirty_bps=dirty, send_bps=send,
                      remaining_bytes=remaining, throttle_pct=0, stun_pct=stun, sdps_exhausted=exhausted)


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


def test_adaptive_leaves_it_to_sdps_until_the_agent_measures_it_cannot() -> None:
    c = ctl("adaptive")
    assert c.start_sdps() is not None
    # the dirty set does not shrink, but SDPS has not said it is exhausted: no downtime step, however stuck
    for i in range(1, 8):
        assert c.on_round(rnd(i, 60 * MB, 60 * MB, 200 * MiB, stun=50 + i)) == []


def test_adaptive_sizes_the_downtime_step_from_the_remaining_bytes_and_the_link() -> None:
    c = ctl("adaptive")
    # 6 MiB left at 30 MB/s: 210 ms, plus 25 % = 263 ms, within the 500 ms allowed: one step, sized
    acts = c.on_round(rnd(2, 30 * MB, 30 * MB, 6 * MiB, stun=99, exhausted=True))
    assert [(a.kind, a.value) for a in acts] == [("downtime-limit", 263)], acts
    assert "6.0 MiB left need 263 ms" in acts[0].why
    # the limit allows it: QEMU gets the rounds to switch over
    assert c.on_round(rnd(3, 30 * MB, 30 * MB, 6 * MiB, stun=99, exhausted=True)) == []
    assert c.on_round(rnd(4, 30 * MB, 30 * MB, 6 * MiB, stun=99, exhausted=True)) == []
    # still no switchover after 3 rounds: the last step
    acts = c.on_round(rnd(5, 30 * MB, 30 * MB, 6 * MiB, stun=99, exhausted=True))
    assert [(a.kind, a.value) for a in acts] == [("downtime-limit", 500)], acts


@pytest.mark.parametrize("allowed", [False, True])
def test_adaptive_moves_on_at_once_when_no_downtime_would_do(allowed: bool) -> None:
    """48 MiB at 30 MB/s need 2 s of downtime: no step can help, so post-copy or a clean abort, in round 2,
    not at the completion timeout (120 s here)."""
    c = ctl("adaptive", allow_postcopy=allowed)
    assert c.on_round(rnd(1, 5 * MB, 30 * MB, 48 * MiB)) == []
    acts = c.on_round(rnd(2, 60 * MB, 30 * MB, 48 * MiB, stun=99, exhausted=True, elapsed=12))
    assert [a.kind for a in acts] == (["postcopy"] if allowed else ["abort"]), acts
    if not allowed:
        why = acts[0].why
        assert "pre-copy cannot converge" in why and "dirties 60.0 MB/s, the link sends 30.0 MB/s" in why
        assert "would need 2098 ms of downtime (at most 500 ms allowed)" in why and "post-copy not allowed" in why
        assert "Rolled back after 12 s" in why


def test_adaptive_quiet_guest_gets_no_decision() -> None:
    c = ctl("adaptive", allow_postcopy=True)
    for i, rem in enumerate((100 * MiB, 30 * MiB, 8 * MiB), 1):
        assert c.on_round(rnd(i, 20 * MB, 60 * MB, rem)) == []


def test_adaptive_goes_post_copy_at_half_the_timeout_only_when_allowed() -> None:
    for allowed in (False, True):
        c = ctl("adaptive", allow_postcopy=allowed)
        kinds = [a.kind for a in c.on_round(rnd(9, 40 * MB, 60 * MB, 64 * MiB, stun=60, elapsed=61))]
        assert kinds == (["postcopy"] if allowed else []), kinds
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
    c.on_round(rnd(3, 120 * MB, 30 * MB, 1 * MiB, stun=5, exhausted=True))
    msg = c.give_up_message(120 * MB, 30 * MB)
    assert "completion timeout of 120 s" in msg and "dirties 120.0 MB/s, the link sends 30.0 MB/s" in msg
    assert "SDPS (stun reached 5% of 5% allowed)" in msg and "downtime limit not stepped" in msg
    assert "post-copy not allowed" in msg
    assert "auto-converge (throttle reached 0% of 90% allowed)" in ctl("auto").give_up_message(1, 1)
