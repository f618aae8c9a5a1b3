"""A vCenter's tasks without a lab: a real ``VCenter`` on a temporary directory (its inventory, certificate and
keys), no hosts (``conftest.vc``). Task states and relocate stages change only along ``tasks.TRANSITIONS``."""

from __future__ import annotations

import asyncio

import pytest

from testbed.errors import Conflict, PhaseError
from testbed.vcenter.service import VCenter
from testbed.vcenter.tasks import TRANSITIONS, Stage, TaskState, can_change


def test_the_table_has_every_state_and_ends_are_final() -> None:
    assert set(TRANSITIONS) == set(TaskState) | set(Stage)
    assert can_change(TaskState.RUNNING, TaskState.SUCCEEDED) and can_change(TaskState.RUNNING, TaskState.FAILED)
    for end in (TaskState.SUCCEEDED, TaskState.FAILED, Stage.COMMITTED):
        assert not TRANSITIONS[end]
    assert not can_change(Stage.PRECHECKS, Stage.COMMITTED), "a move commits only after the engine ran"
    assert not can_change(Stage.MIGRATING, Stage.ADMITTED)


async def test_a_stage_cannot_be_skipped_and_is_written_at_once(vc: VCenter) -> None:
    t = vc.new_task("VirtualMachine.relocate", "vm1", "relocate VM vm1", "u", stage=Stage.PRECHECKS.value)
    with pytest.raises(PhaseError, match="prechecks -> committed"):
        vc.set_stage(t, Stage.COMMITTED)
    assert vc.task(t["id"])["stage"] == "prechecks"
    vc.set_stage(t, Stage.MIGRATING)
    assert vc.task(t["id"])["stage"] == "migrating", "recovery reads the stage from the inventory"
    vc.set_stage(t, Stage.COMMITTED)
    vc.set_stage(t, Stage.COMMITTED)        # recovery committing a committed move again: no change, no error
    assert vc.task(t["id"])["stage"] == "committed"


async def test_a_task_ends_once_and_the_first_ending_stands(vc: VCenter) -> None:
    t = vc.new_task("VirtualMachine.relocate", "vm1", "relocate VM vm1", "u", stage=Stage.PRECHECKS.value)
    vc._finish(t, True)
    vc._finish(t, False, error=Conflict("a late failure"))
    row = vc.task(t["id"])
    assert row["state"] == "SUCCEEDED" and row["error"] is None
    assert vc.task_view(row)["status"] == "SUCCEEDED"


async def test_background_work_ends_its_task_with_the_cause(vc: VCenter) -> None:
    async def refused(t: dict) -> None:  # type: ignore[type-arg]
        raise Conflict("VM vm1 is busy", hint="wait")

    async def bug(t: dict) -> None:  # type: ignore[type-arg]
        raise KeyError("oops")

    t1 = vc.new_task("k", "vm1", "one", "u")
    t2 = vc.new_task("k", "vm2", "two", "u")
    vc.spawn(t1, refused)
    vc.spawn(t2, bug)
    await asyncio.gather(*vc.running.values())
    r1, r2 = vc.task(t1["id"]), vc.task(t2["id"])
    assert r1["state"] == r2["state"] == "FAILED"
    assert r1["error"] == {"message": "VM vm1 is busy", "hint": "wait", "kind": "Conflict"}
    assert r2["error"]["kind"] == "InternalError" and "KeyError" in r2["error"]["message"]
    assert not vc.running
    kinds = [e["kind"] for e in vc.inv.events()]
    assert kinds.count("TaskFailedEvent") == 2


async def test_the_timeline_says_where_a_tasks_time_went(vc: VCenter) -> None:
    from testbed.bench.results import task_steps
    t = vc.new_task("VirtualMachine.relocate", "vm1", "relocate VM vm1", "u", stage=Stage.PRECHECKS.value)
    for phase in ("trust", "prechecks", "prechecks", "admission", "precheck", "disk-sync", "disk-sync", "done",
                  "registration"):
        vc._progress(t, phase, 1)
    vc._finish(t, True)
    view = vc.task_view(vc.task(t["id"]))
    phases = [e["phase"] for e in view["timeline"]]
    assert phases == ["trust", "prechecks", "admission", "precheck", "disk-sync", "done", "registration", "ended"]
    at = [e["at_s"] for e in view["timeline"]]
    assert at == sorted(at) and view["end_time"] - at[-1] < 0.001
    steps = task_steps(view["timeline"])
    assert list(steps) == ["trust", "prechecks", "admission", "engine", "registration"]
    assert abs(sum(steps.values()) - (at[-1] - at[0])) < 0.01
