"""`testbed bench --runs 1`: both engines migrate each workload once and the tables come out well formed.

A benchmark is not a test: this checks that it runs end to end (its own lab with two vCenters, libvirtd on
two hosts, a cross-vCenter relocate and libvirt each moving an idle, a busy and a disk-writing VM) and
that every table has its rows and numbers for both engines, not what the numbers are. The figures are
printed (docs/benchmarks.md has a full run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.bench.results import METRICS, STEPS, TASK_ROW, WORKLOADS

pytestmark = pytest.mark.lab


def test_bench_runs_once_and_prints_a_table_per_workload(lab_env: Path, tmp_path: Path) -> None:
    if not Path("/usr/sbin/libvirtd").exists():
        pytest.skip("libvirtd is not installed; run `make setup`")
    lab = "tb" + os.urandom(2).hex()
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.cli", "--lab", lab, "bench", "--runs", "1", "--force", "--json", str(out_json),
         "--markdown", str(out_md)],
        capture_output=True, text=True, timeout=1500, env={**os.environ, "COLUMNS": "200"}, cwd=tmp_path)
    print(proc.stdout[-8000:])
    print(proc.stderr[-3000:])      # a workload that could not run says why here (the bench goes on to its end)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    # the lab is gone, pass or fail
    assert not (lab_env / "labs" / lab).exists()
    assert not any(n.startswith(f"{lab}-") for n in _netns())

    data = json.loads(out_json.read_text())
    runs = data["runs"]
    for w in WORKLOADS:
        for engine in ("ours", "libvirt"):
            mine = [r for r in runs if r["workload"] == w and r["engine"] == engine]
            assert len(mine) == 1, f"{w}/{engine}: {len(mine)} runs"
            r = mine[0]
            assert r["total_s"] and r["total_s"] > 0, r
            assert r["disk_s"] is not None and r["memory_s"] is not None, r
            assert r["wire_bytes"] and r["wire_bytes"] > 256 * 2**20, r   # the disk's data crossed the link
            assert r["observed_ms"] is not None, r
            if engine == "ours":
                # moved as a user moves it: a relocate task across the two vCenters, which holds the engine's run
                assert r["raw"]["destination"]["vcenter"] in ("vc-a", "vc-b") and \
                    r["raw"]["destination"]["vcenter"] != r["raw"]["source"]["vcenter"], r["raw"]["destination"]
                assert r["task_s"] is not None and r["task_s"] > r["total_s"], (r["task_s"], r["total_s"])
        assert data["physical_limit_s"][w] > 0
        # one table per workload (rich wraps its title), every metric a row, numbers for both engines
        assert f"{w} ({WORKLOADS[w]})" in proc.stdout
    md = out_md.read_text()
    for _, label, _ in METRICS:
        rows = [line for line in md.splitlines() if line.startswith(f"| {label} |")]
        assert len(rows) == len(WORKLOADS), label
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert len(cells) == 8, row
            assert cells[2] != "-" and cells[5] != "-", f"no p50 for one engine: {row}"
    assert md.count("| integrity (memory and disk) |") == len(WORKLOADS)
    task_rows = [line for line in md.splitlines() if line.startswith(f"| {TASK_ROW} |")]
    assert len(task_rows) == len(WORKLOADS) and all(row.split("|")[3].strip() != "-" for row in task_rows), task_rows
    titles = [line for line in md.splitlines() if line.startswith("**") and "step by step" not in line]
    assert len(titles) == len(WORKLOADS) and all("physical limit" in t for t in titles), titles
    # the switchover step by step: QEMU's checkpoints on both sides, for both engines
    assert md.count("the switchover step by step**") == len(WORKLOADS)
    for label, _, _ in STEPS:
        if label.startswith("  of which"):   # the engine's destination agent only
            continue
        rows = [line for line in md.splitlines() if line.startswith(f"| {label} |")]
        assert len(rows) == len(WORKLOADS), label
        assert all(c.strip() != "-" for row in rows for c in row.strip("|").split("|")[1:3]), rows


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]
