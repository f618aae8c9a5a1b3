"""Breakpoints: a relocate held at named engine checkpoints (``testbed.migration.state.FaultHook``) until an
administrator continues it (``POST /api/cis/tasks/{task}?action=continue``) or its time limit passes. For fault
injection in tests and experiments, through the vCenter like every other move: while the move is held, the task's
``held_at`` says where (the checkpoint, since when, the destination's migration URI and NBD export), and the
caller does its harm there (kills a QEMU, cuts the link) before letting it go on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from testbed.errors import Conflict
from testbed.migration.state import FaultHook, MoveState
from testbed.vcenter.base import Hold
from testbed.vcenter.limits import BREAKPOINT_TIMEOUT_S_DEFAULT
from testbed.vcenter.tasks import Tasks, TaskState


def hold_limit_s(options: dict[str, Any]) -> float:
    """The longest one breakpoint of a relocate with these options holds it."""
    return float(options.get("breakpoint_timeout_s") or BREAKPOINT_TIMEOUT_S_DEFAULT)


def holds_at_most_s(options: dict[str, Any]) -> float:
    """How long a relocate with these options may be held in all (each breakpoint holds at most once)."""
    return len(options.get("breakpoints") or ()) * hold_limit_s(options)


class Breakpoints(Tasks):
    """Holding a relocate's engine at its breakpoints; releasing it."""

    def breakpoint_hook(self, t: dict[str, Any], options: dict[str, Any]) -> FaultHook | None:
        """The engine's fault hook for relocate task ``t``: it holds at each of the options' breakpoints once
        (None: the relocate named none)."""
        names = frozenset(options.get("breakpoints") or ())
        if not names:
            return None
        limit_s = hold_limit_s(options)
        passed: set[str] = set()

        async def hook(at: str, mig: MoveState) -> None:
            if at in names and at not in passed:
                passed.add(at)
                await self._hold(t, at, mig.incoming, limit_s)
        return hook

    async def _hold(self, t: dict[str, Any], at: str, incoming: dict[str, Any], limit_s: float) -> None:
        tid, name = t["id"], t["target"]
        hold = self.held[tid] = Hold(at)
        since = time.time()
        t["held_at"] = {"checkpoint": at, "since": since,
                        "incoming": {k: incoming[k] for k in ("uri", "nbd") if k in incoming}}
        self.inv.put_task(t)
        self.inv.event("TaskHeldEvent", f"relocate of VM {name} held at breakpoint {at} ({tid}) for at most "
                       f"{limit_s:g} s: `testbed task continue {tid}` releases it", vm=name, task=tid)
        by = "nobody: the move was interrupted"
        try:
            await asyncio.wait_for(hold.release.wait(), limit_s)
            by = hold.by or "?"
        except TimeoutError:
            by = "its time limit"
        finally:
            if self.held.get(tid) is hold:
                del self.held[tid]
            held_s = round(time.time() - since, 3)
            t["held_at"] = None
            t.setdefault("holds", []).append({"checkpoint": at, "since": since, "held_s": held_s,
                                              "released_by": by})
            t.setdefault("notes", []).append(
                f"breakpoint {at} released by its time limit after {held_s:.1f} s" if by == "its time limit"
                else f"held at breakpoint {at} for {held_s:.1f} s, released by {by}")
            self.inv.put_task(t)
            self.inv.event("TaskReleasedEvent", f"relocate of VM {name} released from breakpoint {at} ({tid}) "
                           f"after {held_s:.1f} s by {by}", vm=name, task=tid)

    def continue_task(self, tid: str, user: str) -> dict[str, Any]:
        """Release the breakpoint task ``tid`` is held at: ``{"released": checkpoint}``."""
        t = self.task(tid)
        hold = self.held.get(tid)
        if hold is None or hold.release.is_set():
            if t["state"] != TaskState.RUNNING:
                raise Conflict(f"task {tid} ({t['description']}) already ended {t['state']}: it is not held at a "
                               "breakpoint", hint=f"nothing to release; `testbed task show {tid}` shows its end")
            names = (t.get("options") or {}).get("breakpoints") or []
            phase = (t.get("progress") or {}).get("phase", "?")
            raise Conflict(f"task {tid} ({t['description']}) is running, in {phase}, not held at a breakpoint",
                           hint=(f"it holds only at its breakpoints ({', '.join(names)}), each once; "
                                 if names else "its relocate named no breakpoints (options.breakpoints); ")
                           + f"`testbed task show {tid}` shows where it is")
        hold.by = user
        hold.release.set()
        return {"released": hold.checkpoint}
