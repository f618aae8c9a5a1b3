"""The source agent's SDPS loop as a controller of the dirty rate (no QEMU: a model guest answers).

The model guest is the two kinds the lab's guest agent runs: open-loop (dirties by the clock as long as
it has the CPU to; ``need`` = the CPU share its rate costs) and CPU-bound (dirties in proportion to the
CPU it gets). The loop sees only what it sees on a host: QEMU's dirty and send counters and the vCPU
threads' CPU time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.hostd.sdps import SdpsLoop, SdpsSettings

MB = 1e6
SEND = 30 * 2**20          # the link, bytes/s
ROUND_S = 1.5


@dataclass
class FakeStun:
    """Stands in for the cgroup: records the stun asked for (the cgroup's effect is the model's job)."""
    stun: float = 0.0
    using: str = "freezer"

    def set(self, stun: float) -> float:
        self.stun = max(0.0, min(stun, 0.99))
        return self.stun

    def release(self) -> None:
        self.stun = 0.0


def run_rounds(kind: str, demand_bps: float, need: float, rounds: int = 12, leak: float = 0.0
               ) -> tuple[SdpsLoop, list[dict[str, Any]]]:
    """``need``: CPU share the guest needs for its whole rate (open-loop) or at full speed (cpu-bound)."""
    loop = SdpsLoop(vm=None, settings=SdpsSettings(), run_dir=Path("/nonexistent"))  # type: ignore[arg-type]
    stun = FakeStun()
    loop._cg, loop.method, loop._tids = stun, "freezer", [1]   # type: ignore[assignment]
    cpu_ns = 0.0
    t, sync, tx = 0.0, 1, 0.0
    loop._cpu_ns = lambda: int(cpu_ns)  # type: ignore[method-assign]
    out = []

    async def go() -> None:
        nonlocal cpu_ns, t, sync, tx
        remaining = 48 * 2**20
        await loop.on_sample({"status": "active", "ram": {"dirty-sync-count": sync}}, t)
        for _ in range(rounds):
            run = 1 - stun.stun
            if kind == "open-loop":
                used = min(need, run + leak)      # leak: a late freezer thread lets the guest run longer
                dirty = demand_bps * used / need
            else:
                used = run
                dirty = demand_bps * run
            cpu_ns += used * ROUND_S * 1e9
            t += ROUND_S
            tx += SEND * ROUND_S
            sync += 1
            remaining = int(min(48 * 2**20, dirty * ROUND_S))
            d = await loop.on_sample({"status": "active", "ram": {
                "dirty-sync-count": sync, "transferred": tx, "remaining": remaining,
                "dirty-pages-rate": dirty / 4096}}, t)
            assert d is not None
            out.append({**d, "true_dirty": dirty})

    asyncio.run(go())
    return loop, out


@pytest.mark.parametrize("kind,need", [("open-loop", 0.2), ("cpu-bound", 1.0)])
def test_the_dirty_rate_is_brought_under_the_send_rate_within_three_rounds(kind: str, need: float) -> None:
    loop, out = run_rounds(kind, 60 * MB, need)
    assert all(d["true_dirty"] <= 0.55 * SEND for d in out[3:]), [(d["stun_pct"], d["true_dirty"]) for d in out]
    assert not loop.exhausted
    # the stun is no deeper than the rates need: the cpu-bound guest keeps ~25 % of its CPU
    if kind == "cpu-bound":
        assert 60 <= out[-1]["stun_pct"] <= 80, out[-1]
    else:
        assert out[-1]["stun_pct"] >= 93, out[-1]   # the open-loop guest pays its debt back until < 7 %


def test_a_guest_that_outpaces_the_link_at_the_ceiling_is_reported_exhausted() -> None:
    # needs 0.5 % of a CPU for 200 MB/s: even 99 % stun leaves it 2x what it needs
    loop, out = run_rounds("open-loop", 200 * MB, 0.005)
    assert out[-1]["stun_pct"] == 99.0 and loop.exhausted and out[-1]["exhausted"]


def test_a_quiet_guest_is_never_stunned() -> None:
    loop, out = run_rounds("open-loop", 5 * MB, 0.02)
    assert all(d["stun_pct"] == 0 for d in out) and not loop.exhausted


def test_a_stun_not_in_force_is_not_called_exhausted() -> None:
    """A loaded host: the freezer thread wakes late and the guest gets 8 % of its vCPU at a 99 % stun. That is
    not the guest outpacing the deepest stun, so adaptive must not give up on it."""
    loop, out = run_rounds("open-loop", 60 * MB, 0.2, leak=0.08)
    assert out[-1]["stun_pct"] == 99.0 and not loop.exhausted
    assert all(not d["exhausted"] for d in out)
