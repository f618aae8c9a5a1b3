"""The record of everything a lab created, kept in ``<labdir>/state.json``.

Every namespace, process and system path is recorded the moment it is
created, so ``lab down`` (or a later ``lab down`` after a crash of ``lab up``
halfway) removes exactly what was made, and nothing else.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field

from testbed.lab.topology import Topology


class ProcessRecord(BaseModel):
    role: str                 # "sshd esx-a1", "observer", ...
    pid: int
    starttime: int            # field 22 of /proc/PID/stat: guards against PID reuse
    netns: str | None = None


class LabState(BaseModel):
    name: str
    status: str = "building"          # building | up | tearing-down
    topology: Topology
    namespaces: list[str] = Field(default_factory=list)
    processes: list[ProcessRecord] = Field(default_factory=list)
    system_paths: list[str] = Field(default_factory=list)  # made outside the lab dir
    link_bandwidth_bps: int | None = None
    link_up: bool = True
    accel: str = "tcg"
    accel_reason: str = ""
    created_s: float = 0.0
    up_s: float | None = None


def proc_starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def record_alive(p: ProcessRecord) -> bool:
    """The recorded process still runs (same PID and start time, and not a zombie)."""
    try:
        stat = Path(f"/proc/{p.pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and int(fields[19]) == p.starttime


class StateFile:
    """state.json with an exclusive lock held across read-modify-write."""

    def __init__(self, lab_dir: Path) -> None:
        self.path = lab_dir / "state.json"
        self.lock_path = lab_dir / "state.lock"

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> LabState:
        return LabState.model_validate_json(self.path.read_text())

    def save(self, state: LabState) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(state.model_dump_json(indent=1))
        os.replace(tmp, self.path)

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def load_json(path: Path, default: object) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
