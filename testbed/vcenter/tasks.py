"""Tasks: a long operation as a row in the inventory, updated as it goes, so a restarted vCenter finds it.

A task's state and a relocate's stage change only along the transitions in ``TRANSITIONS``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from testbed.errors import NotFound, PhaseError, PrecheckFailed, TestbedError
from testbed.vcenter.base import VcBase

log = logging.getLogger("testbed.vcenter")


class TaskState(StrEnum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class Stage(StrEnum):
    """How far a relocate got: what an abort, a rollback or restart recovery has to undo."""
    PRECHECKS = "prechecks"     # nothing started anywhere
    ADMITTED = "admitted"       # the destination vCenter holds a placeholder and granted a ticket
    MIGRATING = "migrating"     # the engine runs: a destination QEMU may exist
    COMMITTED = "committed"     # the inventories follow the VM to its destination


TRANSITIONS: dict[TaskState | Stage, frozenset[TaskState | Stage]] = {
    TaskState.RUNNING: frozenset({TaskState.SUCCEEDED, TaskState.FAILED}),
    TaskState.SUCCEEDED: frozenset(),
    TaskState.FAILED: frozenset(),
    Stage.PRECHECKS: frozenset({Stage.ADMITTED, Stage.MIGRATING}),   # across vCenters / within one
    Stage.ADMITTED: frozenset({Stage.MIGRATING}),
    Stage.MIGRATING: frozenset({Stage.COMMITTED}),
    Stage.COMMITTED: frozenset(),
}


def can_change(old: TaskState | Stage, new: TaskState | Stage) -> bool:
    return new in TRANSITIONS[old]


def task_verdict(t: dict[str, Any]) -> str | None:
    """A relocate's outcome in one word: verified | unverified | failed | rolled_back (None: not a finished move).

    ``unverified``: the VM runs on the destination and its source copy is kept (the task SUCCEEDED).
    """
    if t.get("verdict"):
        return str(t["verdict"])
    r = t.get("result") or {}
    if not isinstance(r, dict) or "integrity" not in r:
        return None
    return {"succeeded": "unverified" if r.get("accepted_unverified") else "verified"}.get(r["result"], r["result"])


class Tasks(VcBase):
    """Create, end and look up tasks; run their work in the background."""

    def set_stage(self, t: dict[str, Any], stage: Stage) -> None:
        """Record how far a relocate got (written at once: restart recovery reads it). The same stage again
        (recovery committing a move that had committed) changes nothing."""
        old = Stage(t["stage"])
        if old is stage:
            return
        if not can_change(old, stage):
            raise PhaseError(old, stage)
        t["stage"] = stage.value
        self.inv.put_task(t)

    def new_task(self, kind: str, target: str, description: str, user: str, **data: Any) -> dict[str, Any]:
        t = {"id": f"task-{secrets.token_hex(5)}", "kind": kind, "target": target, "state": TaskState.RUNNING.value,
             "started_s": time.time(), "ended_s": None, "description": description, "user": user,
             "progress": {"phase": "queued", "percent": 0}, "prechecks": [], "result": None, "error": None,
             "vcenter": self.cfg.name, **data}
        self.inv.put_task(t)
        self.inv.event("TaskCreatedEvent", f"{description} ({t['id']})", vm=target, task=t["id"])
        return t

    def task(self, tid: str) -> dict[str, Any]:
        t = self.inv.task(tid)
        if t is None:
            raise NotFound(f"task {tid!r} is not in vCenter {self.cfg.name}",
                           hint="`testbed task list` shows the recent tasks")
        return t

    def task_view(self, t: dict[str, Any]) -> dict[str, Any]:
        return {"id": t["id"], "operation": t["kind"], "target": t["target"],
                "status": t["state"],
                "description": t["description"], "user": t.get("user"), "vcenter": self.cfg.name,
                "start_time": t["started_s"], "end_time": t["ended_s"], "progress": t.get("progress"),
                "prechecks": t.get("prechecks", []), "result": t.get("result"), "error": t.get("error"),
                "notes": t.get("notes", []), "verdict": task_verdict(t), "timeline": t.get("timeline", []),
                # a row's held_at counts only while this vCenter holds the move (one left by a restart does not)
                "held_at": t.get("held_at") if t["id"] in self.held else None, "holds": t.get("holds", [])}

    def _finish(self, t: dict[str, Any], ok: bool, *, error: TestbedError | str | None = None,
                result: Any = None) -> None:
        new = TaskState.SUCCEEDED if ok else TaskState.FAILED
        if not can_change(TaskState(t["state"]), new):
            # a second ending (a bug): the first stands, and what came after it is logged, not lost
            log.error("task %s already ended %s; not ending it again as %s (error: %s)",
                      t["id"], t["state"], new, error)
            return
        t["state"] = new.value
        t["ended_s"] = time.time()
        if t.get("timeline"):
            t["timeline"].append({"phase": "ended", "at_s": round(t["ended_s"], 3)})
        if result is not None:
            t["result"] = result
        if error is not None:
            t["error"] = {"message": str(error.args[0] if isinstance(error, TestbedError) else error),
                          "hint": error.hint if isinstance(error, TestbedError) else None,
                          "kind": type(error).__name__ if isinstance(error, TestbedError) else "InternalError"}
            if isinstance(error, PrecheckFailed):
                t["error"]["failed_checks"] = [c["name"] for c in error.checks]
        t["progress"] = {**t.get("progress", {}), "percent": 100}
        self.inv.put_task(t)
        self.inv.event("TaskCompletedEvent" if ok else "TaskFailedEvent",
                       f"{t['description']}: {'succeeded' if ok else 'failed: ' + t['error']['message']}",
                       vm=t["target"], task=t["id"])

    def spawn(self, t: dict[str, Any], work: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        async def run() -> None:
            try:
                await work(t)
            except TestbedError as err:
                self._finish(t, False, error=err)
            except Exception as err:  # a bug: still end the task, with the cause
                log.exception("task %s", t["id"])
                self._finish(t, False, error=f"internal error: {type(err).__name__}: {err}")
            finally:
                self.running.pop(t["id"], None)
        self.running[t["id"]] = asyncio.get_running_loop().create_task(run())

    def _progress(self, t: dict[str, Any], phase: str, percent: float, **detail: Any) -> None:
        t["progress"] = {"phase": phase, "percent": round(percent, 1), **detail}
        now = time.monotonic()
        if phase != t.get("_last_phase"):   # when each phase began (the vCenter's clock): where the task's time went
            t.setdefault("timeline", []).append({"phase": phase, "at_s": round(time.time(), 3)})
        if phase != t.get("_last_phase") or now - t.get("_last_write", 0) > 0.5:
            t["_last_phase"], t["_last_write"] = phase, now
            self.inv.put_task(t)
