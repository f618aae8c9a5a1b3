"""The record of everything a lab created, kept in ``<labdir>/state.json``.

Every namespace, process and system path is recorded the moment it is
created, so ``lab down`` (or a later ``lab down`` after a crash of ``lab up``
halfway) removes exactly what was made, and nothing else.
"""

from __future__ import annotations

import fcntl
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
    # inside the lab dir but not made by the lab (a Vagrant lab's host identities): teardown leaves them
    kept_paths: list[str] = Field(default_factory=list)
    root_links: list[str] = Field(default_factory=list)    # interfaces made in the root namespace (nested hosts)
    libvirt_uri: str | None = None                         # the libvirtd the nested hosts' L1 VMs run on
    libvirt_domains: list[str] = Field(default_factory=list)   # the L1 VMs (transient domains) this lab started
    libvirtd_started: bool = False                         # this lab started that libvirtd (and stops it)
    libvirt_run_dir_created: bool = False                  # ... and /run/libvirt did not exist before
    link_bandwidth_bps: int | None = None
    link_up: bool = True
    link_delay_us: int = 0            # one-way, each direction
    link_jitter_us: int = 0
    link_loss_ppm: int = 0
    link_mechanism: str = "bridge"    # netem | delay-line | bridge (see testbed.net.wan)
    link_generation: int = 0          # settings generation the delay line last confirmed
    tcp_buffers: str | None = None    # lab-wide override of every host's tcp_buffers (None: the topology's)
    accel: str = "tcg"
    accel_reason: str = ""
    created_s: float = 0.0
    up_s: float | None = None


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def proc_starttime(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def record_alive(p: ProcessRecord) -> bool:
    """The recorded process still runs (same PID and start time, and not a zombie)."""
    fields = _stat(p.pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == p.starttime


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
