"""One clock for every instant of a move: the engine's.

Each host agent stamps its events with its own ``time.monotonic()``; on a nested or Vagrant
host that is another machine's clock, unrelated to the engine's and to the observer's. Before
each move the engine measures every clock's offset over the channel it already has (NTP's
idea, Cristian's algorithm): several request/response exchanges, and the one with the
shortest round trip gives offset = remote - (sent + received) / 2, within +- RTT / 2. Every
instant an agent reports is then mapped onto the engine's clock (``to_engine``), and every
instant the engine asks the observer about onto the observer's (``to_remote``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

EXCHANGES = 8


@dataclass(frozen=True)
class Offset:
    offset_s: float = 0.0          # remote clock minus the engine's
    uncertainty_s: float = 0.0     # half the best round trip
    rtt_s: float = 0.0

    def to_engine(self, remote_s: float) -> float:
        return remote_s - self.offset_s

    def to_remote(self, engine_s: float) -> float:
        return engine_s + self.offset_s

    def as_dict(self) -> dict[str, float]:
        return {"offset_s": round(self.offset_s, 6), "uncertainty_s": round(self.uncertainty_s, 6),
                "rtt_s": round(self.rtt_s, 6)}


async def measure(remote_now: Callable[[], Awaitable[float]], exchanges: int = EXCHANGES) -> Offset:
    """The offset of the clock ``remote_now`` reads (one request/response each), from the best of ``exchanges``."""
    best: tuple[float, float] | None = None     # (rtt, offset)
    for _ in range(exchanges):
        t0 = time.monotonic()
        remote = await remote_now()
        t1 = time.monotonic()
        rtt = t1 - t0
        if best is None or rtt < best[0]:
            best = (rtt, remote - (t0 + t1) / 2)
    assert best is not None
    return Offset(offset_s=best[1], uncertainty_s=best[0] / 2, rtt_s=best[0])


def map_instants(data: Any, clock: Offset) -> None:
    """An agent event's payload onto the engine's clock, in place: every top-level number whose key ends in
    ``_s`` is an instant of the agent's monotonic clock (``monotonic_s``, ``t_s``, ``at_s``, ``paused_s``, ...)."""
    if not isinstance(data, dict):
        return
    for k, v in data.items():
        if k.endswith("_s") and isinstance(v, int | float) and not isinstance(v, bool):
            data[k] = clock.to_engine(float(v))
