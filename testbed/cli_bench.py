"""``testbed bench``: the engine and libvirt's live migration side by side (``testbed.bench.runner``)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from testbed.errors import InputError
from testbed.units import parse_rate_bytes

out = Console()


def bench(a: argparse.Namespace) -> int:
    from testbed.bench.results import ENGINES, WORKLOADS, BenchSettings
    from testbed.bench.runner import Bench, markdown
    workloads = tuple(w.strip() for w in a.workloads.split(",") if w.strip())
    engines = tuple(e.strip() for e in a.engines.split(",") if e.strip())
    for w in workloads:
        if w not in WORKLOADS:
            raise InputError(f"--workloads: {w!r} is not a workload", hint=f"use some of: {', '.join(WORKLOADS)}")
    for e in engines:
        if e not in ENGINES:
            raise InputError(f"--engines: {e!r} is not an engine", hint=f"use some of: {', '.join(ENGINES)}")
    if a.runs < 1:
        raise InputError("--runs must be at least 1")
    if not 1 <= a.streams <= 16:
        raise InputError(f"--streams {a.streams}: use 1 to 16")
    from testbed.lab import quality
    quality.refuse_if_busy("testbed bench", a.force)
    s = BenchSettings(runs=a.runs, workloads=workloads, link_bps=parse_rate_bytes(a.link), streams=a.streams,
                      downtime_limit_ms=a.downtime_limit, lab=a.lab if a.lab_given else "bench", engines=engines,
                      libvirt_debug=a.libvirt_debug)
    b = Bench(s, log=lambda m: out.print(m, markup=False, highlight=False))
    try:
        asyncio.run(b.run())
    finally:
        if b.runs:
            for t in b.tables():
                out.print(t)
            if a.json:
                Path(a.json).write_text(json.dumps(b.to_json(), indent=1, default=str))
            if a.markdown:
                Path(a.markdown).write_text(markdown(b))
    return 0 if b.runs and all(r.ok for r in b.runs) else 1


def register(sub: Any) -> None:
    s = sub.add_parser("bench", help="benchmark the engine against libvirt's live migration, side by side "
                                     "(own lab; prints a table per workload)")
    s.add_argument("--runs", type=int, default=5, help="migrations per engine and workload (default 5)")
    s.add_argument("--workloads", default="idle,busy,disk",
                   help="idle, busy (20 MB/s of memory), disk (4 MB/s of disk writes); default all three")
    s.add_argument("--engines", default="ours,libvirt", help="default: ours,libvirt")
    s.add_argument("--link", default="100MiB/s", help="the site link's cap (default 100MiB/s)")
    s.add_argument("--streams", type=int, default=1,
                   help="TCP streams for memory, both engines (multifd / libvirt --parallel); default 1")
    s.add_argument("--downtime-limit", type=int, default=30, help="ms, both engines (default 30)")
    s.add_argument("--json", help="write every run and the settings to this file")
    s.add_argument("--markdown", help="write the tables as Markdown to this file")
    s.add_argument("--force", action="store_true",
                   help="start even when the machine is busy (1-minute load above 0.75 per CPU); runs whose load "
                        "rose above 1.5 per CPU are marked LOADED either way")
    s.add_argument("--libvirt-debug", action="store_true",
                   help="libvirtd logs its QMP traffic; the logs are kept in ./libvirtd-logs-LAB")
    s.set_defaults(fn=bench)
