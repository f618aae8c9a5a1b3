"""Experiments: ``testbed experiment NAME`` runs one on a private lab and reports a table and a chart.

Each experiment brings up its own two-site lab with its two vCenters (jumbo frames
on the vMotion network; ``testbed.bench.harness``), moves its VMs through them,
takes the lab down afterwards whatever happens, and returns an
``Outcome``: rows (one per measurement), the columns to show, and chart panels.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from testbed.experiments.chart import Panel


@dataclass
class Outcome:
    name: str
    title: str
    columns: list[tuple[str, str]]                 # (key in a row, heading)
    rows: list[dict[str, Any]] = field(default_factory=list)
    panels: list[Panel] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)   # machine, load, settings
    notes: list[str] = field(default_factory=list)


Experiment = Callable[..., Coroutine[Any, Any, Outcome]]


def registry() -> dict[str, tuple[Experiment, str]]:
    from testbed.experiments import distance
    return {
        "downtime-vs-rtt": (distance.downtime_vs_rtt, "downtime (reported, observed) and total time vs RTT, "
                                                      "idle and busy guest, fixed bandwidth"),
        "streams": (distance.streams_vs_rtt, "memory-phase throughput vs RTT for 1/2/4/8 multifd channels, "
                                             "kernel vs tuned TCP buffers, share of the link"),
        "disk-mirror": (distance.disk_mirror, "write-blocking vs background-throttled disk mirror at 0 and 50 ms "
                                              "RTT while the guest writes"),
    }
