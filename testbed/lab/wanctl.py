"""The lab's side of the long-distance link: start the delay line, apply settings, tune hosts.

``testbed.net.wan`` knows the mechanisms; this module ties them to a lab's
state: the delay line is a lab process recorded in ``state.json`` (``lab down``
stops exactly it), and every change is saved there so ``link show`` and
``lab status`` report what is in force.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.errors import LabError
from testbed.lab import kinds
from testbed.lab import topology as topo
from testbed.lab.state import LabState, ProcessRecord, proc_starttime, record_alive
from testbed.net import fabric, wan
from testbed.net.cmd import ip_batch

ROLE = "wan delay-line"
Save = Callable[[], None]


def conf_path(lab_dir: Path) -> Path:
    return lab_dir / "wan.conf"


def shape_of(state: LabState) -> wan.Shape:
    return wan.Shape(delay_us=state.link_delay_us, jitter_us=state.link_jitter_us, loss_ppm=state.link_loss_ppm,
                     bandwidth_bps=state.link_bandwidth_bps)


def site_namespaces(t: topo.Topology) -> list[str]:
    return [fabric.ns_name(t.name, s.name) for s in t.sites]


def delay_line(state: LabState) -> ProcessRecord | None:
    return next((p for p in state.processes if p.role == ROLE and record_alive(p)), None)


def _needs_line(state: LabState) -> bool:
    return bool(state.link_delay_us or state.link_jitter_us or state.link_loss_ppm)


def start(t: topo.Topology, state: LabState, lab_dir: Path, save: Save) -> None:
    """After the WAN namespace is wired (legs bridged): the topology's settings, by ``state.link_mechanism``."""
    state.link_delay_us, state.link_jitter_us = t.link.delay_us, t.link.jitter_us
    state.link_loss_ppm = t.link.loss_ppm
    apply(state, lab_dir, bandwidth_changed=bool(t.link.bandwidth_bps), save=save)


def _refuse_delay(state: LabState) -> None:
    if _needs_line(state):
        raise LabError(f"lab {state.name} has {len(state.topology.sites)} sites and this kernel has no sch_netem: "
                       "the delay line joins exactly two sites, so delay, jitter and loss are not available",
                       hint="use two sites, or a kernel with CONFIG_NET_SCH_NETEM")


def apply(state: LabState, lab_dir: Path, *, bandwidth_changed: bool, save: Save) -> None:
    """Put ``state``'s link settings in force (``save`` records a delay line started or stopped)."""
    t, mech = state.topology, state.link_mechanism
    if mech == wan.NETEM:
        wan.apply_netem(t, site_namespaces(t), shape_of(state))
        return
    if mech == wan.DELAY_LINE:
        rec = delay_line(state)
        if _needs_line(state) and rec is None:
            _engage(state, lab_dir, save)
        elif _needs_line(state) and rec is not None:
            state.link_generation += 1
            conf = conf_path(lab_dir)
            wan.write_conf(conf, state.link_generation, shape_of(state))
            wan.signal_and_wait(conf, rec.pid, signal.SIGHUP, state.link_generation)
        elif rec is not None:
            _disengage(state, rec, save)
    else:
        _refuse_delay(state)
    if bandwidth_changed:
        fabric.shape_link(t, state.link_bandwidth_bps)


def _engage(state: LabState, lab_dir: Path, save: Save) -> None:
    """Take the site legs off ``br-wan`` and put the delay line between them."""
    t = state.topology
    wan_ns = fabric.ns_name(t.name, "wan")
    conf = conf_path(lab_dir)
    argv = wan.delayline_argv(conf, t)          # builds the program first if needed: before any change
    state.link_generation += 1
    wan.write_conf(conf, state.link_generation, shape_of(state))
    with contextlib.suppress(FileNotFoundError):
        Path(f"{conf}.status").unlink()
    wan.site_segmentation(site_namespaces(t), for_delay_line=True)
    ip_batch(wan.legs_commands(t, bridged=False), netns=wan_ns)
    log = lab_dir / "wan.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", wan_ns, *argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    rec = ProcessRecord(role=ROLE, pid=proc.pid, starttime=proc_starttime(proc.pid) or 0, netns=wan_ns)
    state.processes.append(rec)
    save()
    wan.wait_started(conf, lambda: proc.poll() is None)


def _disengage(state: LabState, rec: ProcessRecord, save: Save) -> None:
    """Bridge the site legs again and stop the delay line."""
    t = state.topology
    ip_batch(wan.legs_commands(t, bridged=True), netns=fabric.ns_name(t.name, "wan"))
    wan.site_segmentation(site_namespaces(t), for_delay_line=False)
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while record_alive(rec) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(rec.pid, os.WNOHANG)
        time.sleep(0.01)
    if record_alive(rec):
        raise LabError(f"the delay line (pid {rec.pid}) did not stop on SIGTERM within 5 s",
                       hint="`lab down` kills it with the lab")
    state.processes = [p for p in state.processes if p is not rec]
    save()


def counters(state: LabState, lab_dir: Path) -> dict[str, Any] | None:
    """The delay line's settings in force and its per-direction counters (None for other mechanisms)."""
    rec = delay_line(state)
    if state.link_mechanism != wan.DELAY_LINE or rec is None:
        return None
    return wan.signal_and_wait(conf_path(lab_dir), rec.pid, signal.SIGUSR1)


def host_buffers(state: LabState) -> dict[str, int | None]:
    """Each host's TCP buffer ceiling now (None: the kernel's)."""
    shape = shape_of(state)
    return {h.name: wan.tcp_buffer_max(state.tcp_buffers or h.tcp_buffers, shape)
            for *_, h in state.topology.hosts()}


def tune_hosts(state: LabState) -> dict[str, int | None]:
    """Apply every host's TCP buffer setting, as its kind does (an L1 VM gets its buffers with its identity)."""
    ceilings = host_buffers(state)
    for *_, h in state.topology.hosts():
        kinds.of(h).tune_tcp_buffers(state.name, h.name, ceilings[h.name])
    return ceilings
