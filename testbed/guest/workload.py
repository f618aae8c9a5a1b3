"""Workload specs (``idle``, ``memory:20MB/s@256M``, ``disk:5MB/s``, ``cpu-bound``, comma-joined)
and the kernel command line that configures the guest agent with them.

Two kinds of memory load, both real page writes into a verified working set:

- open-loop (default): the guest dirties by the clock, like a service whose requests arrive
  whatever the VM's speed (a cache or session store filled by clients, a database buffer pool
  under a fixed request rate, a stream ingester). Slowed down, it owes the work and pays it back
  as soon as it runs again (up to 50 ms of burst), so a CPU stun only helps once the CPU it may
  have falls below what it needs.
- ``cpu-bound``: the rate is per CPU-second the guest gets (each page costs a fixed amount of CPU
  work, calibrated at boot so that a whole vCPU writes the given rate), like a batch job, an
  in-memory analytics or compression job, a build or a GC-heavy JVM: any stun slows it in proportion.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from testbed.errors import InputError
from testbed.units import parse_rate_bytes, parse_size

DEFAULT_WSS = 64 * 1024**2
IDLE_WSS = 16 * 1024**2       # idle guests: filled once, verified about once a second, never dirtied
KERNEL_BASE_ARGS = "console=ttyS0 loglevel=4 random.trust_cpu=on"


class Workload(BaseModel):
    model_config = ConfigDict(frozen=True)
    mem_rate_bps: int = Field(default=0, ge=0)
    mem_wss_bytes: int = Field(default=DEFAULT_WSS, gt=0)
    disk_rate_bps: int = Field(default=0, ge=0)
    mem_cpu_bound: bool = False      # the memory rate is per CPU-second the guest gets, not by the clock

    def describe(self) -> str:
        parts = []
        if self.mem_rate_bps:
            parts.append(f"memory:{self.mem_rate_bps / 1e6:g}MB/s@{self.mem_wss_bytes // 1024**2}M")
        if self.disk_rate_bps:
            parts.append(f"disk:{self.disk_rate_bps / 1e6:g}MB/s")
        if self.mem_cpu_bound:
            parts.append("cpu-bound")
        return ",".join(parts) or "idle"


def parse_workload(spec: str) -> Workload:
    """``idle`` | ``memory:RATE[@WSS]`` | ``disk:RATE`` | comma-joined mix; ``cpu-bound`` makes the memory
    rate one per CPU-second."""
    fields: dict[str, int | bool] = {}
    for part in (p.strip() for p in spec.split(",")):
        kind, _, arg = part.partition(":")
        kind = kind.lower()
        try:
            if kind == "idle" and not arg:
                continue
            if kind == "cpu-bound" and not arg:
                fields["mem_cpu_bound"] = True
                continue
            if kind in ("memory", "mem") and arg:
                rate, _, wss = arg.partition("@")
                fields["mem_rate_bps"] = parse_rate_bytes(rate, what="memory dirty rate")
                if wss:
                    fields["mem_wss_bytes"] = parse_size(wss, what="working set")
                continue
            if kind == "disk" and arg:
                fields["disk_rate_bps"] = parse_rate_bytes(arg, what="disk write rate")
                continue
        except InputError as err:
            raise InputError(f"workload {spec!r}: {err.message}", hint=err.hint) from err
        raise InputError(f"workload {spec!r}: cannot read {part!r}",
                         hint="use idle, memory:20MB/s, memory:20MB/s@256M, disk:5MB/s, or a comma-joined mix "
                              "(memory:60MB/s@48M,cpu-bound: the rate per CPU-second the guest gets)")
    if fields.get("mem_cpu_bound") and not fields.get("mem_rate_bps"):
        raise InputError(f"workload {spec!r}: cpu-bound needs a memory rate",
                         hint="for example memory:60MB/s@48M,cpu-bound")
    return Workload(**fields)  # type: ignore[arg-type]


# What the VM's own settings write on a built-in guest's command line: a user's extra arguments may not set them
# (the guest takes the last value it sees, so an append could make its heartbeats speak for another VM, or
# make it carry a load its workload does not say). The agent's tuning parameters stay the user's to set.
OWN_PARAMETERS = frozenset({"tb.vm", "tb.ip", "tb.observer", "tb.mem_rate", "tb.mem_wss", "tb.mem_mode",
                            "tb.disk_rate"})
TUNING_PARAMETERS = frozenset({"tb.gw", "tb.hb_us", "tb.disk_dev", "tb.disk_span"})


def agent_cmdline(vm: str, ip_cidr: str | None, observer: str | None, workload: Workload,
                  memory_bytes: int, extra: str = "") -> str:
    """The kernel command line of a built-in guest."""
    own = sorted({tok.split("=", 1)[0] for tok in extra.split()} & OWN_PARAMETERS)
    if own:   # the agent's name, address and observer are what its heartbeats are believed by
        raise InputError(f"VM {vm}: the extra kernel arguments set {', '.join(own)}, the built-in guest agent's "
                         "own parameters (its VM name, address, observer and workload come from the VM itself)",
                         hint="drop them; use the VM's workload option for the load, or boot your own kernel "
                              f"(tuning parameters such as {', '.join(sorted(TUNING_PARAMETERS))} are allowed)")
    if workload.mem_rate_bps and workload.mem_wss_bytes > memory_bytes * 0.7:
        raise InputError(f"VM {vm}: working set {workload.mem_wss_bytes // 1024**2} MiB does not fit "
                         f"in {memory_bytes // 1024**2} MiB of RAM",
                         hint="keep the working set under about 70% of the VM's memory")
    args = [KERNEL_BASE_ARGS, f"tb.vm={vm}"]
    if ip_cidr:
        args.append(f"tb.ip={ip_cidr}")
    if observer:
        args.append(f"tb.observer={observer}")
    if workload.mem_rate_bps:
        args += [f"tb.mem_rate={workload.mem_rate_bps}", f"tb.mem_wss={workload.mem_wss_bytes}"]
        if workload.mem_cpu_bound:
            args.append("tb.mem_mode=cpu")
    else:
        args += [f"tb.mem_wss={IDLE_WSS}"]
    if workload.disk_rate_bps:
        args.append(f"tb.disk_rate={workload.disk_rate_bps}")
    if extra:
        args.append(extra)
    return " ".join(args)
