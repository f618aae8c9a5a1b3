"""How quiet the machine was while something was measured: load average and CPU steal, at start and end.

Two cores under TCG turn a second QEMU-heavy job into noise (tables once taken at load 8-11 were off by
2-5x), so benchmarks and experiments refuse to start on a busy machine (``refuse_if_busy``; ``--force``
overrides) and mark every run during which the load rose above ``LOADED_PER_CPU`` per CPU (``Watch``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import InputError

QUIET_PER_CPU = 0.75        # a start above this 1-minute load per CPU is refused (1.5 on 2 cores)
LOADED_PER_CPU = 1.5        # a run during which the load rose above this is marked loaded (3 on 2 cores)
SAMPLE_S = 2.0


def cpus() -> int:
    return os.cpu_count() or 1


def load1() -> float:
    return os.getloadavg()[0]


def _cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    steal = fields[7] if len(fields) > 7 else 0
    return steal, sum(fields[:8])


def refuse_if_busy(what: str, force: bool) -> None:
    """Refuse to start a measurement on a busy machine, saying what is too high and how to go on anyway."""
    limit = QUIET_PER_CPU * cpus()
    now = load1()
    if now > limit and not force:
        raise InputError(f"{what}: the 1-minute load average is {now:.2f}, above {limit:g} on this "
                         f"{cpus()}-CPU machine: its numbers would measure the other work, not the migration",
                         hint="wait until nothing else runs QEMU (`uptime`), or pass --force (the report says so)")


@dataclass
class Watch:
    """Samples the load while a run goes on; ``summary()`` says how quiet it was."""

    load_at_start: tuple[float, float, float] = field(default_factory=os.getloadavg)
    max_load1: float = 0.0
    _steal0: tuple[int, int] = field(default_factory=_cpu_times)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.max_load1 = self.load_at_start[0]

    def __enter__(self) -> Watch:
        self._thread = threading.Thread(target=self._sample, name="load-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=SAMPLE_S + 1)
        self.load_at_end = os.getloadavg()
        self.max_load1 = max(self.max_load1, self.load_at_end[0])
        self._steal1 = _cpu_times()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.max_load1 = max(self.max_load1, load1())

    def summary(self) -> dict[str, Any]:
        end = getattr(self, "load_at_end", os.getloadavg())
        s1 = getattr(self, "_steal1", _cpu_times())
        dt = s1[1] - self._steal0[1]
        steal = round(100 * (s1[0] - self._steal0[0]) / dt, 2) if dt > 0 else 0.0
        return {"load_at_start": [round(x, 2) for x in self.load_at_start],
                "load_at_end": [round(x, 2) for x in end], "max_load_1m": round(self.max_load1, 2),
                "steal_pct": steal, "cpus": cpus(),
                "loaded": self.max_load1 > LOADED_PER_CPU * cpus(), "at": time.time()}
