"""Workload specs (``idle``, ``memory:20MB/s@256M``, ``disk:5MB/s``, comma-joined)
and the kernel command line that configures the guest agent with them."""

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

    def describe(self) -> str:
        parts = []
        if self.mem_rate_bps:
            parts.append(f"memory:{self.mem_rate_bps / 1e6:g}MB/s@{self.mem_wss_bytes // 1024**2}M")
        if self.disk_rate_bps:
            parts.append(f"disk:{self.disk_rate_bps / 1e6:g}MB/s")
        return ",".join(parts) or "idle"


def parse_workload(spec: str) -> Workload:
    """``idle`` | ``memory:RATE[@WSS]`` | ``disk:RATE`` | comma-joined mix."""
    fields: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        kind, _, arg = part.partition(":")
        kind = kind.lower()
        try:
            if kind == "idle" and not arg:
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
                         hint="use idle, memory:20MB/s, memory:20MB/s@256M, disk:5MB/s, or a comma-joined mix")
    return Workload(**fields)


def agent_cmdline(vm: str, ip_cidr: str | None, observer: str | None, workload: Workload,
                  memory_bytes: int, extra: str = "") -> str:
    """The kernel command line of a built-in guest."""
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
    else:
        args += [f"tb.mem_wss={IDLE_WSS}"]
    if workload.disk_rate_bps:
        args.append(f"tb.disk_rate={workload.disk_rate_bps}")
    if extra:
        args.append(extra)
    return " ".join(args)
