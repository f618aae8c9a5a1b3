"""The benchmarks' shared harness and their command line, without a lab: ``testbed bench`` alone is still the
comparison with libvirt, its subcommands reach the benchmarks that were ``benchmarks/``; a move's result says
failed when its task failed; the engine's start is placed on this process's clock from the task's timeline."""

from __future__ import annotations

import time
from typing import Any

import pytest

from testbed import cli, cli_bench
from testbed.bench import harness
from testbed.errors import InputError
from testbed.migration.report import MigrationReport, PhaseSpan
from testbed.vcenter.labvms import Move

QUIET = {"load_at_start": [0.5, 0.4, 0.3], "load_at_end": [0.6, 0.4, 0.3], "max_load_1m": 0.7, "steal_pct": 0.0,
         "cpus": 2, "loaded": False, "at": 0.0}


def test_bench_alone_is_still_the_libvirt_comparison() -> None:
    a = cli.parse(["bench", "--runs", "2"])
    assert a.fn is cli_bench.bench and a.runs == 2 and a.bench_cmd is None


@pytest.mark.parametrize("argv,fn", [(["bench", "convergence", "--runs", "1"], cli_bench.convergence),
                                     (["bench", "downtime", "--runs", "1", "--vm-memory", "256M"], cli_bench.downtime),
                                     (["bench", "wan", "--rtts", "0,10"], cli_bench.wan),
                                     (["bench", "resume", "--resumes", "3"], cli_bench.resume)])
def test_bench_subcommands(argv: list[str], fn: Any) -> None:
    a = cli.parse([*argv, "--lab", "bx1"])
    assert a.fn is fn
    assert a.lab == "bx1" and a.lab_given


def test_bench_subcommand_input_is_checked_before_any_lab() -> None:
    with pytest.raises(InputError, match="--modes: 'fast'"):
        cli_bench.convergence(cli.parse(["bench", "convergence", "--modes", "sdps,fast"]))
    with pytest.raises(InputError, match="--sdps-max-stun 100"):
        cli_bench.convergence(cli.parse(["bench", "convergence", "--sdps-max-stun", "100"]))
    with pytest.raises(InputError, match="--rtts"):
        cli_bench.wan(cli.parse(["bench", "wan", "--rtts", "0,ten"]))
    with pytest.raises(InputError, match="--workloads: 'huge'"):
        cli_bench.resume(cli.parse(["bench", "resume", "--workloads", "idle,huge"]))
    with pytest.raises(InputError, match="--resumes 0"):
        cli_bench.resume(cli.parse(["bench", "resume", "--resumes", "0"]))


def _report(result: str, phases: list[tuple[str, float, float]]) -> MigrationReport:
    return MigrationReport.model_construct(result=result, error=None, source_kept=False,
                                           phases=[PhaseSpan(name=n, start_s=a, end_s=b) for n, a, b in phases])


def test_a_move_whose_task_failed_is_failed() -> None:
    ok = _report("succeeded", [("precheck", 0.01, 0.2)])
    failed_task = {"status": "FAILED", "error": {"message": "registration at vc-b failed"}}
    m = harness.Measured(move=Move(task=failed_task, report=ok), source="esx-a1", destination="esx-b1",
                         quality=QUIET)
    assert m.result == "failed" and m.error == "registration at vc-b failed"
    never = harness.Measured(move=Move(task=failed_task, report=None), source="esx-a1", destination="esx-b1",
                             quality=QUIET)
    assert never.result == "failed" and never.report is None
    fine = harness.Measured(move=Move(task={"status": "SUCCEEDED"}, report=ok), source="esx-a1",
                            destination="esx-b1", quality=QUIET)
    assert fine.result == "succeeded" and fine.load == "0.50->0.60 (max 0.70, steal 0%)"


def test_engine_start_on_this_clock_from_the_task_timeline() -> None:
    """The vCenter wrote, on its wall clock, when the engine's phases began; the report has them on the engine's
    clock: the engine's start lands on this process's monotonic clock."""
    wall0 = time.time() - 10.0                          # the engine started 10 s ago
    task = {"status": "SUCCEEDED", "timeline": [{"phase": "trust", "at_s": wall0 - 1.0},
                                                {"phase": "precheck", "at_s": round(wall0 + 0.05, 3)},
                                                {"phase": "disk-sync", "at_s": round(wall0 + 0.4, 3)}]}
    r = _report("succeeded", [("precheck", 0.05, 0.4), ("disk-sync", 0.4, 1.0)])
    t0 = harness.engine_start(Move(task=task, report=r))
    assert t0 is not None and abs(t0 - (time.monotonic() - 10.0)) < 0.05
    assert harness.engine_start(Move(task=task, report=None)) is None
