"""``testbed scenario list | validate FILE | run FILE [--report DIR] [--repeat N]``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console()


def scenario_list(a: argparse.Namespace) -> int:
    from testbed.scenarios.load import load_scenario, shipped
    table = Table("scenario", "VMs", "steps", "description")
    for p in shipped():
        sc = load_scenario(p)
        table.add_row(p.stem, str(len(sc.vms)), str(len(sc.steps)), sc.description.strip().split("\n")[0])
    out.print(table)
    return 0


def scenario_validate(a: argparse.Namespace) -> int:
    from testbed.scenarios.load import load_scenario
    sc = load_scenario(a.file)
    out.print(f"scenario [bold]{sc.name}[/] is valid: {len(sc.vms)} VM(s), {len(sc.steps)} step(s)")
    return 0


def scenario_run(a: argparse.Namespace) -> int:
    from testbed.scenarios import report
    from testbed.scenarios.load import load_scenario
    from testbed.scenarios.runner import run_scenario
    sc = load_scenario(a.file)
    rep = run_scenario(sc, lab=a.lab if a.lab_given else None, repeat=a.repeat,
                       log=lambda s: out.print(s, highlight=False, markup=False))
    s = rep["summary"]
    for key in ("downtime_observed_ms", "downtime_reported_ms", "task_s"):
        st = s.get(key)
        if st:
            out.print(f"{key}: min {st['min']}, p50 {st['p50']}, p95 {st['p95']}, max {st['max']} (n={st['n']})")
    out_dir = Path(a.report or f"reports/{sc.name}")
    j, h = report.write(rep, out_dir)
    out.print(f"scenario {sc.name}: {'[bold green]PASSED[/]' if rep['passed'] else '[bold red]FAILED[/]'}; "
              f"report: {h} and {j}")
    return 0 if rep["passed"] else 1


def register(sub: Any) -> None:
    sc = sub.add_parser("scenario", help="run experiments described in YAML").add_subparsers(dest="sub",
                                                                                              required=True)
    sc.add_parser("list", help="the shipped scenarios (scenarios/*.yaml)").set_defaults(fn=scenario_list)
    s = sc.add_parser("validate", help="check a scenario file without building anything")
    s.add_argument("file", help="a path, or the name of a shipped scenario")
    s.set_defaults(fn=scenario_validate)
    s = sc.add_parser("run", help="build its lab (or use --lab if it is up), run it, write the report")
    s.add_argument("file", help="a path, or the name of a shipped scenario")
    s.add_argument("--report", help="directory for report.json and report.html (default: reports/NAME)")
    s.add_argument("--repeat", type=int, default=1, help="run the steps N times (min/p50/p95/max across them)")
    s.set_defaults(fn=scenario_run)
