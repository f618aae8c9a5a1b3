"""Teardown removes a lab's directory but what the lab did not make (``LabState.kept_paths``)."""

from __future__ import annotations

from pathlib import Path

from testbed.lab.builder import _remove_dir


def test_remove_dir_keeps_what_it_is_told(tmp_path: Path) -> None:
    d = tmp_path / "lab"
    (d / "hosts" / "esx-a1").mkdir(parents=True)
    (d / "hosts" / "esx-a1" / "root-password").write_text("x")
    (d / "key").write_text("k")
    (d / "state.json").write_text("{}")
    (d / "vcenters" / "vc-a").mkdir(parents=True)
    (d / "vcenters" / "vc-a" / "log").write_text("l")
    _remove_dir(d, {d / "key", d / "hosts"})
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == ["hosts", "hosts/esx-a1",
                                                                    "hosts/esx-a1/root-password", "key"]


def test_remove_dir_without_keep_removes_all(tmp_path: Path) -> None:
    d = tmp_path / "lab"
    (d / "a" / "b").mkdir(parents=True)
    (d / "a" / "b" / "f").write_text("x")
    _remove_dir(d, set())
    assert not d.exists()
