"""The long-distance link between the sites: delay, jitter, loss, and TCP tuned for it.

Mechanisms, chosen once per lab (``choose_mechanism``) and shown by ``link show``:

- ``netem``: where the kernel has ``sch_netem``, each site's ``wan0`` egress gets
  ``netem delay D jitter J loss L`` (under the ``tbf`` bandwidth cap when there is one);
  ``L-wan`` bridges the site legs.
- ``delay-line``: where it does not (this project's machine): while the link has delay,
  jitter or loss, the two site legs leave ``br-wan`` and ``tb-wan`` (``tb-wan.c``, built
  on first use) moves the frames between them through one timed FIFO per direction
  (AF_PACKET, packet level: TCP sees the real RTT). With none of the three set, the legs
  are bridged again and the program stopped, so a plain lab spends no CPU on it. The
  bandwidth cap stays the sites' ``tbf``. Settings change while it runs: the controller
  writes ``wan.conf`` and sends SIGHUP; the program confirms the generation in
  ``wan.conf.status``.
- ``bridge``: no netem and more than two sites: bandwidth caps only.

Delay is one-way and applied to each direction, so the RTT is twice it.

TCP for long fat pipes: each host namespace's ``tcp_rmem``/``tcp_wmem`` ceiling
(per network namespace on this kernel) is set from the host's ``tcp_buffers``:
``auto`` = twice the bandwidth-delay product (never below the kernel's own),
``kernel`` = the kernel's values, or an explicit size.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import CommandError, LabError
from testbed.lab import topology as topo
from testbed.net.cmd import run
from testbed.paths import testbed_home
from testbed.units import parse_size

NETEM, DELAY_LINE, BRIDGE = "netem", "delay-line", "bridge"
SOURCE = Path(__file__).with_name("tb-wan.c")
ASSUMED_UNCAPPED_BPS = 10 * 10**9 // 8        # "auto" buffers on an uncapped link: size for 10 Gbit/s
MAX_AUTO_BUFFER = 256 * 2**20
_netem: bool | None = None


@dataclass(frozen=True)
class Shape:
    """What the link does to each direction. ``delay_us`` is one-way."""

    delay_us: int = 0
    jitter_us: int = 0
    loss_ppm: int = 0
    bandwidth_bps: int | None = None

    @property
    def rtt_ms(self) -> float:
        return 2 * self.delay_us / 1000


def netem_available() -> bool:
    """Probe once: can a qdisc of kind netem be made here (in a scratch namespace)?"""
    global _netem
    if _netem is None:
        ns = f"tbprobe{os.getpid()}"
        run(["ip", "netns", "add", ns])
        try:
            r = run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], check=False)
            _netem = r.returncode == 0
        finally:
            run(["ip", "netns", "del", ns], check=False)
    return _netem


def choose_mechanism(t: topo.Topology) -> str:
    if netem_available():
        return NETEM
    return DELAY_LINE if len(t.sites) == 2 else BRIDGE


def delayline_binary() -> Path:
    """The compiled delay line, built from ``tb-wan.c`` on first use (cached by the source's hash)."""
    src = SOURCE.read_bytes()
    out = testbed_home() / "bin" / f"tb-wan-{hashlib.sha256(src).hexdigest()[:12]}"
    if out.exists():
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise LabError("this kernel has no sch_netem, so the lab needs its own delay line (tb-wan.c), "
                       "and gcc is not installed to build it", hint="run `make setup` (installs gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    r = subprocess.run([gcc, "-O2", "-Wall", "-static", "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"building the delay line {SOURCE} failed:\n{r.stderr.strip()}",
                       hint="static linking needs libc6-dev (`make setup`)")
    os.replace(tmp, out)
    return out


def leg(site: str) -> str:
    """The WAN namespace's port towards ``site``."""
    return f"s-{site}"[:15]


def legs_commands(t: topo.Topology, bridged: bool) -> list[str]:
    return [f"link set {leg(s.name)} {'master br-wan' if bridged else 'nomaster'}" for s in t.sites]


def site_segmentation(ns_of_site: list[str], for_delay_line: bool) -> None:
    """Frames must reach the delay line at most one MTU long: the sites segment before ``wan0``
    (``gso_max_segs 1``); the bridge takes GSO packets whole (65535, the default)."""
    for ns in ns_of_site:
        run(["ip", "-n", ns, "link", "set", "dev", "wan0", "gso_max_segs", "1" if for_delay_line else "65535"])


def delayline_argv(conf: Path, t: topo.Topology) -> list[str]:
    return [str(delayline_binary()), str(conf), *(leg(s.name) for s in t.sites)]


def write_conf(conf: Path, generation: int, shape: Shape) -> None:
    tmp = conf.with_suffix(".tmp")
    tmp.write_text(f"gen={generation} delay_us={shape.delay_us} jitter_us={shape.jitter_us} "
                   f"loss_ppm={shape.loss_ppm}\n")
    os.replace(tmp, conf)


def read_status(conf: Path) -> dict[str, Any]:
    """``wan.conf.status`` as a dict: settings in force plus per-direction counters."""
    try:
        text = Path(f"{conf}.status").read_text()
    except FileNotFoundError:
        return {}
    lines = text.splitlines()
    out: dict[str, Any] = {k: int(v) for k, v in (f.split("=") for f in lines[0].split())}
    for line in lines[1:]:
        name, *fields = line.split()
        out[name] = {k: int(v) for k, v in (f.split("=") for f in fields)}
    return out


def signal_and_wait(conf: Path, pid: int, sig: int, generation: int | None = None,
                    timeout_s: float = 5.0) -> dict[str, Any]:
    """Send ``sig`` to the delay line and wait until its status file shows it was handled."""
    before = read_status(conf).get("req", -1)
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while True:
        st = read_status(conf)
        if st.get("req", -1) != before and (generation is None or st.get("gen") == generation):
            return st
        if time.monotonic() > deadline:
            raise LabError(f"the delay line (pid {pid}) did not confirm within {timeout_s:.0f} s "
                           f"(status file {conf}.status: {st or 'missing'})",
                           hint=f"see {conf.parent / 'wan.log'}; `lab down` and `lab up` rebuild it")
        time.sleep(0.005)


def wait_started(conf: Path, alive: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not Path(f"{conf}.status").exists():
        if not alive():
            raise LabError(f"the delay line exited right after start; see {conf.parent / 'wan.log'}")
        if time.monotonic() > deadline:
            raise LabError(f"the delay line did not start within {timeout_s:.0f} s; see {conf.parent / 'wan.log'}")
        time.sleep(0.01)


def apply_netem(t: topo.Topology, site_namespaces: list[str], shape: Shape) -> None:
    """netem (and tbf) on each site's ``wan0`` egress: the whole qdisc tree, replaced."""
    for ns in site_namespaces:
        run(["tc", "-n", ns, "qdisc", "del", "dev", "wan0", "root"], check=False)
        netem = []
        if shape.delay_us or shape.jitter_us:
            netem += ["delay", f"{shape.delay_us}us"] + (["jitter", f"{shape.jitter_us}us"] if shape.jitter_us else [])
        if shape.loss_ppm:
            netem += ["loss", f"{shape.loss_ppm / 10_000}%"]
        if netem:
            netem += ["limit", "100000"]
        parent = ["root"]
        if shape.bandwidth_bps:
            burst = max(shape.bandwidth_bps // 100, 64 * 1024)
            run(["tc", "-n", ns, "qdisc", "add", "dev", "wan0", "root", "handle", "1:", "tbf",
                 "rate", f"{shape.bandwidth_bps * 8}bit", "burst", str(burst), "latency", "50ms"])
            parent = ["parent", "1:1"]
        if netem:
            run(["tc", "-n", ns, "qdisc", "add", "dev", "wan0", *parent, "handle", "10:", "netem", *netem])


# --- TCP tuning -----------------------------------------------------------------------

def kernel_tcp_buffers() -> tuple[list[int], list[int]]:
    """The kernel's own tcp_rmem and tcp_wmem (min, default, max), read in the root namespace."""
    def read(name: str) -> list[int]:
        return [int(x) for x in Path(f"/proc/sys/net/ipv4/{name}").read_text().split()]
    return read("tcp_rmem"), read("tcp_wmem")


def tcp_buffer_max(setting: str, shape: Shape) -> int | None:
    """The socket buffer ceiling for ``setting``; None = the kernel's own."""
    if setting == "kernel":
        return None
    if setting != "auto":
        return parse_size(setting, what="tcp_buffers")
    rtt_s = 2 * (shape.delay_us + shape.jitter_us) / 1e6
    bdp = int((shape.bandwidth_bps or ASSUMED_UNCAPPED_BPS) * rtt_s)
    rmem, wmem = kernel_tcp_buffers()
    want = min(2 * bdp, MAX_AUTO_BUFFER)
    return want if want > min(rmem[2], wmem[2]) else None


def apply_tcp_buffers(netns: str, ceiling: int | None) -> dict[str, str]:
    """Set tcp_rmem/tcp_wmem in ``netns``; returns what is now in force.

    Tuned hosts also keep their congestion window across idle spells (``tcp_slow_start_after_idle=0``):
    a migration stream that pauses for the switchover must not restart in slow start, a round trip
    per doubling, when the last dirty pages are sent with the guest stopped.
    """
    rmem, wmem = kernel_tcp_buffers()
    if ceiling is not None:
        rmem, wmem = [rmem[0], rmem[1], max(rmem[2], ceiling)], [wmem[0], wmem[1], max(wmem[2], ceiling)]
    values = {"net.ipv4.tcp_rmem": " ".join(map(str, rmem)), "net.ipv4.tcp_wmem": " ".join(map(str, wmem)),
              "net.ipv4.tcp_slow_start_after_idle": "0" if ceiling is not None else "1"}
    try:
        run(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())], netns=netns)
    except CommandError as err:
        raise LabError(f"setting TCP buffers in {netns} failed: {err}",
                       hint="tcp_rmem/tcp_wmem are per network namespace since Linux 4.15") from err
    return values

