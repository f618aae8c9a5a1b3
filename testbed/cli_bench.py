"""``testbed bench``: the engine and libvirt's live migration side by side (``testbed.bench.runner``); and its
subcommands, each on a lab of its own with its vCenters: ``convergence`` (the controllers side by side,
``testbed.bench.convergence``), ``downtime`` (N moves of one VM, where the downtime went,
``testbed.bench.downtime``), ``resume`` (a resume's first heartbeat: the same QEMU against the first one after a
move, ``testbed.bench.resume``), ``wan`` (the site link against its targets, ``testbed.bench.wan_delayline``)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from testbed.errors import InputError
from testbed.units import parse_rate_bytes
from testbed.vcenter import limits as lim

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


def _log(msg: str) -> None:
    out.print(msg, markup=False, highlight=False)


def _lab(a: argparse.Namespace, default: str) -> str:
    return str(a.lab) if a.lab_given else default


def _items(text: str, what: str, known: Any) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    for x in items:
        if x not in known:
            raise InputError(f"{what}: {x!r} is not one of them", hint=f"use some of: {', '.join(known)}")
    if not items:
        raise InputError(f"{what}: name at least one", hint=f"use some of: {', '.join(known)}")
    return items


def _runs(n: int) -> int:
    if n < 1:
        raise InputError(f"--runs {n}: give at least 1")
    return n


def convergence(a: argparse.Namespace) -> int:
    from testbed.bench import convergence as cv
    if a.sdps_max_stun is not None and not 1 <= a.sdps_max_stun <= 99:
        raise InputError(f"--sdps-max-stun {a.sdps_max_stun}: give a percentage from 1 to 99")
    s = cv.Settings(lab=_lab(a, "bconv"), runs=_runs(a.runs), link=a.link,
                    link_bps=parse_rate_bytes(a.link, what="--link"), modes=_items(a.modes, "--modes", cv.MODES),
                    workloads=_items(a.workloads, "--workloads", cv.WORKLOADS), downtime_limit_ms=a.downtime_limit,
                    completion_timeout_s=a.completion_timeout, allow_postcopy=a.allow_postcopy,
                    sdps_max_stun_pct=a.sdps_max_stun, vm_memory_bytes=a.vm_memory, vm_disk_bytes=a.vm_disk)
    from testbed.lab import quality
    quality.refuse_if_busy("testbed bench convergence", a.force)
    rows: list[dict[str, Any]] = []
    try:
        asyncio.run(cv.run(s, _log, into=rows))
    finally:
        # a run that stopped early still shows what it measured
        if rows:
            out.print(cv.table(s, rows))
            if a.markdown:
                Path(a.markdown).write_text(cv.markdown(rows))
            if a.json:
                Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if rows and all(r["result"] == "succeeded" for r in rows) else 1


def downtime(a: argparse.Namespace) -> int:
    from testbed.bench import downtime as dt
    s = dt.Settings(lab=_lab(a, "bdown"), runs=_runs(a.runs), workload=a.workload, link=a.link,
                    link_bps=parse_rate_bytes(a.link, what="--link"), downtime_limit_ms=a.downtime_limit,
                    streams=a.streams, converge=a.converge, vm_memory_bytes=a.vm_memory, vm_disk_bytes=a.vm_disk)
    from testbed.lab import quality
    quality.refuse_if_busy("testbed bench downtime", a.force)
    result = dt.Result(rows=[], reports=[])
    try:
        asyncio.run(dt.run(s, _log, into=result))
    finally:
        if result.reports:
            out.print(dt.table(s, result.rows))
            out.print(dt.NOTE, markup=False, highlight=False)
            if a.json:
                Path(a.json).write_text(json.dumps({"rows": result.rows, "reports": result.reports}, indent=1,
                                                   default=str))
    return 0 if len(result.rows) == s.runs else 1


def wan(a: argparse.Namespace) -> int:
    from testbed.bench import wan_delayline as wd
    try:
        rtts = tuple(int(x) for x in a.rtts.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--rtts {a.rtts!r}: give whole milliseconds, comma-separated (e.g. 0,10,100)") from None
    if not rtts or any(not 0 <= r <= 10_000 for r in rtts):
        raise InputError(f"--rtts {a.rtts!r}: give RTTs from 0 to 10000 ms, comma-separated")
    if not 0 < a.seconds <= 600:
        raise InputError(f"--seconds {a.seconds}: give more than 0 and at most 600")
    if not 1280 <= a.mtu <= 9000:
        raise InputError(f"--mtu {a.mtu}: give 1280 to 9000")
    from testbed.lab import quality
    quality.refuse_if_busy("testbed bench wan", a.force)
    asyncio.run(wd.run(wd.Settings(lab=_lab(a, "bwan"), mtu=a.mtu, seconds=a.seconds, rtts_ms=rtts), _log))
    return 0


def resume(a: argparse.Namespace) -> int:
    from testbed.bench import resume as rs
    workloads = _items(a.workloads, "--workloads", rs.WORKLOADS)
    if not 1 <= a.resumes <= 100:
        raise InputError(f"--resumes {a.resumes}: give 1 to 100")
    from testbed.lab import quality
    quality.refuse_if_busy("testbed bench resume", a.force)
    rows = asyncio.run(rs.run(rs.Settings(lab=_lab(a, "bresume"), resumes=a.resumes, workloads=workloads), _log))
    out.print(rs.markdown(rows), markup=False, highlight=False)
    if a.markdown:
        Path(a.markdown).write_text(rs.markdown(rows))
    return 0


def _force(s: argparse.ArgumentParser) -> None:
    s.add_argument("--force", action="store_true",
                   help="start even when the machine is busy (1-minute load above 0.75 per CPU); every number is "
                        "printed with the load it was measured under either way")


def _register_subcommands(bench: argparse.ArgumentParser) -> None:
    sub = bench.add_subparsers(dest="bench_cmd", required=False, metavar="{convergence,downtime,resume,wan}",
                               help="instead of the comparison with libvirt (each on a lab of its own, with its "
                                    "vCenters; --lab names it)")
    s = sub.add_parser("convergence", help="the convergence controllers side by side: every mode x every "
                                           "workload on a capped link")
    s.add_argument("--runs", type=int, default=1, help="moves per mode and workload (default 1)")
    s.add_argument("--link", default="60MiB/s", help="the site link's cap (default 60MiB/s)")
    s.add_argument("--modes", default=",".join(("auto-converge", "sdps", "postcopy", "adaptive")),
                   help="convergence modes, comma-separated (default auto-converge,sdps,postcopy,adaptive)")
    s.add_argument("--workloads", default="idle,20,150,sweep",
                   help="idle, 20, 150, sweep, open-loop, cpu-bound (default idle,20,150,sweep)")
    s.add_argument("--downtime-limit", type=lim.arg_downtime_limit, default=100, help="ms (default 100)")
    s.add_argument("--completion-timeout", type=lim.arg_completion_timeout, default=None, metavar="SECONDS",
                   help="default: the engine's, per GiB of RAM")
    s.add_argument("--allow-postcopy", action="store_true", help="adaptive may fall back to post-copy")
    s.add_argument("--sdps-max-stun", type=int, default=None, metavar="PCT",
                   help="SDPS's ceiling, 1-99 %% (default: the engine's, 99)")
    s.add_argument("--vm-memory", type=lim.arg_memory, default=512 * lim.MiB, help="default 512M")
    s.add_argument("--vm-disk", type=lim.arg_disk, default=256 * lim.MiB, help="default 256M")
    s.add_argument("--json", help="write every row to this file")
    s.add_argument("--markdown", help="write the table as Markdown to this file")
    _force(s)
    s.set_defaults(fn=convergence)

    s = sub.add_parser("downtime", help="N moves of one VM back and forth: downtime, total time and where the "
                                        "observed downtime went")
    s.add_argument("--runs", type=int, default=10, help="moves (default 10)")
    s.add_argument("--workload", type=lim.arg_workload, default="memory:20MB/s@128M",
                   help="the guest's workload (default memory:20MB/s@128M)")
    s.add_argument("--link", default="100MiB/s", help="the site link's cap (default 100MiB/s)")
    s.add_argument("--downtime-limit", type=lim.arg_downtime_limit, default=100, help="ms (default 100)")
    s.add_argument("--streams", type=lim.arg_streams, default=1, help="multifd channels, 1-16 (default 1)")
    s.add_argument("--converge", choices=lim.CONVERGE_CHOICES, default="adaptive",
                   help="the convergence mode of every move (default adaptive; in the title)")
    s.add_argument("--vm-memory", type=lim.arg_memory, default=512 * lim.MiB, help="default 512M")
    s.add_argument("--vm-disk", type=lim.arg_disk, default=1024 * lim.MiB, help="default 1G")
    s.add_argument("--json", help="write the rows and every move's report to this file")
    _force(s)
    s.set_defaults(fn=downtime)

    s = sub.add_parser("resume", help="the guest's first heartbeat after a resume: of the same QEMU, and the first "
                                      "one after a move (a new QEMU: its TCG code cache is empty)")
    s.add_argument("--resumes", type=int, default=10, help="pause/resume pairs on each side of the move (default 10)")
    s.add_argument("--workloads", default="idle,busy", help="idle, busy (20 MB/s of memory); default both")
    s.add_argument("--markdown", help="write the table as Markdown to this file")
    _force(s)
    s.set_defaults(fn=resume)

    s = sub.add_parser("wan", help="the site link against its targets: RTT accuracy 0-200 ms, TCP rate at 100 ms "
                                   "RTT (no VMs)")
    s.add_argument("--mtu", type=int, default=9000, help="the vMotion network's MTU (default 9000)")
    s.add_argument("--seconds", type=float, default=8.0, help="each TCP transfer (default 8)")
    s.add_argument("--rtts", default=",".join(map(str, (0, 1, 2, 5, 10, 50, 100, 150, 200))),
                   help="RTTs to check with ping, ms, comma-separated (default 0,1,2,5,10,50,100,150,200)")
    _force(s)
    s.set_defaults(fn=wan)


def register(sub: Any) -> None:
    s = sub.add_parser("bench", help="benchmark the engine against libvirt's live migration, side by side "
                                     "(own lab; prints a table per workload); or `bench convergence|downtime|wan`")
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
    _register_subcommands(s)
