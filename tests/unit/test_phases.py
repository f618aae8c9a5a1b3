"""The migration phase machine: legal transitions in one place, illegal ones refused."""

import pytest

from testbed.errors import PhaseError
from testbed.migration.phases import TRANSITIONS, Phase, PhaseMachine

HAPPY = [Phase.PRECHECK, Phase.DISK_SYNC, Phase.MEMORY_PRECOPY, Phase.SWITCHOVER, Phase.VERIFY,
         Phase.COMMIT, Phase.DONE]


def test_happy_path_and_timeline() -> None:
    m = PhaseMachine(t0=100.0)
    for i, p in enumerate(HAPPY):
        m.enter(p, at=100.0 + i)
    assert m.sequence == HAPPY
    assert [(r.start_s, r.end_s) for r in m.timeline][:2] == [(0.0, 1.0), (1.0, 2.0)]
    assert m.timeline[-1].end_s == m.timeline[-1].start_s == 6.0


@pytest.mark.parametrize("failing", HAPPY[:5])
def test_rollback_is_legal_before_commit(failing: Phase) -> None:
    m = PhaseMachine()
    for p in HAPPY[: HAPPY.index(failing) + 1]:
        m.enter(p)
    m.enter(Phase.ROLLBACK)
    m.enter(Phase.ROLLED_BACK)
    assert m.failed_in is failing


def test_no_rollback_after_commit_and_no_skipping() -> None:
    m = PhaseMachine()
    for p in HAPPY[:6]:
        m.enter(p)
    with pytest.raises(PhaseError, match="commit -> rollback"):
        m.enter(Phase.ROLLBACK)
    m2 = PhaseMachine()
    m2.enter(Phase.PRECHECK)
    with pytest.raises(PhaseError):
        m2.enter(Phase.SWITCHOVER)


def test_terminal_phases_have_no_exit() -> None:
    for p in (Phase.DONE, Phase.ROLLED_BACK, Phase.FAILED):
        assert TRANSITIONS[p] == frozenset()
