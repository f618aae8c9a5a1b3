"""The scenario format: the shipped files validate; bad ones are refused before anything is built,
with the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import InputError
from testbed.scenarios.load import load_scenario, parse_scenario, shipped


def test_shipped_scenarios_are_valid() -> None:
    names = {p.stem for p in shipped()}
    assert {"xvmotion-basic", "busy-server-converge", "datacenter-upgrade", "resource-balancing",
            "disaster-avoidance", "hardware-refresh", "cloud-exit", "security-zoning", "faults"} <= names
    for p in shipped():
        assert load_scenario(p).name == p.stem


@pytest.mark.parametrize("text, line, words", [
    ("name: x\nvms:\n  - {name: a, host: esx-a1}\nsteps:\n  - relocate: {vm: a, to_host: esx-b1, colour: 1}\n",
     5, "steps.0.relocate.colour: Extra inputs are not permitted"),
    ("name: x\nvms:\n  - name: a\n    host: esx-z9\nsteps:\n  - wait: 1\n",
     4, "vms.0.host: VM a is on host 'esx-z9', which is not in the topology"),
    ("name: x\nvms:\n  - {name: a, host: esx-a1, memory: lots}\nsteps:\n  - wait: 1\n",
     3, "vms.0.memory"),
    ("name: x\nvms:\n  - {name: a, host: esx-a1}\nsteps:\n  - relocate: {vm: b, to_host: esx-b1}\n",
     5, "steps.0.relocate.vm: VM 'b' is not one of the scenario's VMs"),
    ("name: x\nvms:\n  - {name: a, host: esx-a1}\nsteps:\n  - wait: 1\n    link: {cut: true}\n",
     5, "a step is exactly one of"),
    ("name: x\nvms:\n  - {name: a, host: esx-a1}\nsteps:\n  - relocate:\n      vm: a\n      to_host: esx-b1\n"
     "      expect: {result: failed, max_downtime_observed_ms: 100}\n",
     8, "a move expected to fail has no downtime to check"),
    ("name: x\nvms:\n  - {name: a, host: esx-a1}\nsteps:\n  - fault: {kind: cut-link, at: verify, "
     "move: {vm: a, to_host: esx-b1}}\n", 5, "fault cut-link can be injected at: disk-sync, memory-precopy"),
    ("name: x\nvms: [\n", 2, "not valid YAML"),
    ("name: x\nvms:\n  - {name: a, host: esx-a1, kernel: k, workload: 'memory:5MB/s'}\nsteps:\n  - wait: 1\n",
     3, "vms.0.workload: a workload needs the built-in guest"),
    ("name: x\nvms:\n  - {name: a, host: esx-a1, kernel: /etc/shadow}\nsteps:\n  - wait: 1\n",
     3, "not a content library item name"),
    ("name: x\nvms:\n  - {name: a, host: esx-a1, image: ../x}\nsteps:\n  - wait: 1\n",
     3, "not a content library item name"),
])
def test_bad_scenarios_point_at_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(InputError) as e:
        parse_scenario(text, "s.yaml")
    msg = str(e.value)
    assert words in msg, msg
    if "YAML" not in words:
        assert f"s.yaml:{line}:" in msg, msg


def test_vm_defaults_are_the_documented_ones() -> None:
    """docs/scenarios.md: memory 256M by default, disk 128M by default, ``disk: null`` for none."""
    from testbed.scenarios.model import VmDef
    assert VmDef(name="a", host="esx-a1").memory == 256 * 2**20
    assert VmDef(name="a", host="esx-a1").disk == 128 * 2**20
    assert VmDef(name="a", host="esx-a1", disk=None).disk is None
    doc = (Path(__file__).parents[2] / "docs" / "scenarios.md").read_text()
    assert "default 256M" in doc and "default 128M; `disk: null` for none" in doc
