"""Every shipped scenario runs, end to end, and its expectations hold; and the downtime suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.scenarios import report
from testbed.scenarios.load import load_scenario, parse_scenario, shipped
from testbed.scenarios.runner import run_scenario

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.stem)
def test_shipped_scenario_runs_and_holds(lab_env: Path, tmp_path: Path, path: Path) -> None:
    sc = load_scenario(path)
    rep = run_scenario(sc, log=print)
    j, h = report.write(rep, tmp_path / sc.name)
    assert j.exists() and "<svg" in h.read_text()
    for run in rep["runs"]:
        assert run["error"] is None, run["error"]
        for m in run["moves"]:
            bad = [c for c in m["checks"] if not c["held"]]
            assert not bad, f"{m['vm']} {m['from']} -> {m['to']}: {bad}"
    assert rep["passed"]


DOWNTIME = """
name: downtime-suite
link: {bandwidth_bps: 100MiB/s}
vms:
  - {name: idle1, host: esx-a1, memory: 256M, disk: 128M, workload: idle}
  - {name: busy1, host: esx-a1, memory: 256M, disk: 128M, workload: "memory:20MB/s@64M"}
  - {name: disk1, host: esx-a2, memory: 256M, disk: 128M, workload: "disk:4MB/s"}
steps:
  - relocate: {vm: idle1, to_host: esx-b1}
  - relocate: {vm: busy1, to_host: esx-b1}
  - relocate: {vm: disk1, to_host: esx-b2}
expect: {result: succeeded, max_downtime_observed_ms: 1000, integrity: true}
"""
OBSERVER_RESOLUTION_MS = 2.0   # the guest beats every 1 ms; one missed beat either side


def test_downtime_under_a_second_for_idle_busy_and_disk_writing_guests(
        lab_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = run_scenario(parse_scenario(DOWNTIME, "downtime-suite"), log=print)
    moves = rep["runs"][0]["moves"]
    assert [m["vm"] for m in moves] == ["idle1", "busy1", "disk1"]
    with capsys.disabled():   # the figures belong in the test output, passed or not
        print("\ndowntime suite (cross-vCenter, 100 MiB/s link): VM, reported ms, observed ms")
        for m in moves:
            if m.get("report"):
                dt = m["report"]["downtime_ms"]
                print(f"  {m['vm']:8} {dt['reported']!s:>8} {dt['observed']!s:>10}")
    for m in moves:
        r = m["report"]
        assert r is not None and m["status"] == "SUCCEEDED", m["error"]
        rep_ms, obs_ms = r["downtime_ms"]["reported"], r["downtime_ms"]["observed"]
        assert rep_ms is not None and obs_ms is not None
        assert obs_ms < 1000
        assert obs_ms >= rep_ms - OBSERVER_RESOLUTION_MS, "users cannot feel less than QEMU's own stop"
        assert r["integrity"]["memory"] == "verified" and r["integrity"]["disk"] == "verified"
    assert rep["passed"]
