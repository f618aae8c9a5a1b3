"""``--lab`` before or after the subcommand, and ``$TESTBED_LAB``, for every command (README: "Commands")."""

from __future__ import annotations

import pytest

from testbed.cli import parse

COMMANDS = [["vm", "list"], ["lab", "status"], ["lab", "attach", "--vagrant"], ["scenario", "run", "x.yaml"],
            ["bench"], ["vcenter", "list"], ["task", "list"], ["link", "show"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c))
def test_lab_flag_anywhere_and_the_environment(cmd: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TESTBED_LAB", raising=False)
    for argv in (["--lab", "l1", *cmd], [*cmd, "--lab", "l1"]):
        a = parse(argv)
        assert (a.lab, a.lab_given) == ("l1", True), argv
    a = parse(cmd)
    assert (a.lab, a.lab_given) == ("tb", False)
    monkeypatch.setenv("TESTBED_LAB", "envlab")
    a = parse(cmd)
    assert (a.lab, a.lab_given) == ("envlab", True)
    assert parse([*cmd, "--lab", "l2"]).lab == "l2"      # the flag wins over the environment
