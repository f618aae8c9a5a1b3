"""The limits of every value a person gives a vCenter, in one place: the REST API's request models use these
types, and so do the scenario format and the CLI above it (same bounds, same messages, one source).

A size or rate is an integer (bytes, bytes/s) or a string the units parser reads ("512M", "30MiB/s"); either
way it must lie within its bounds (zero and negative refused), and a JSON ``true`` or ``1.5`` is not a size.
Names follow ``testbed.names``; modes are closed sets (``Literal``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, Field, StrictInt, StringConstraints, WithJsonSchema

from testbed.errors import InputError
from testbed.guest.workload import parse_workload
from testbed.migration.convergence import normalize
from testbed.names import ITEM_NAME_RULE, VM_NAME_RULE, check_vm_name, item_name_ok
from testbed.units import format_bytes, parse_rate_bytes, parse_size

MiB, GiB, TiB = 2**20, 2**30, 2**40

MEMORY_MIN, MEMORY_MAX = 64 * MiB, 64 * GiB          # the built-in guest wants >= 256M; QEMU's own floor is lower
DISK_MIN, DISK_MAX = 1 * MiB, 2 * TiB
VCPUS_MIN, VCPUS_MAX = 1, 16
STREAMS_MIN, STREAMS_MAX = 1, 16                     # multifd channels (XvMotion Streams)
BANDWIDTH_MIN, BANDWIDTH_MAX = 1, 100 * 10**9        # bytes/s: 1 B/s to 100 GB/s (800 Gbit/s)
DOWNTIME_LIMIT_MS_MIN, DOWNTIME_LIMIT_MS_MAX = 1, 60_000
COMPLETION_TIMEOUT_S_MAX = 24 * 3600.0               # a ticket lasts at most 24 h (testbed.vcenter.admission)
GRANULARITY_MIN, GRANULARITY_MAX = 512, 64 * MiB     # QEMU's blockdev-mirror granularity, a power of 2
STALL_TIMEOUT_S_MAX = 600.0                          # no migration progress for this long: the move fails
POSTCOPY_RECOVERY_TIMEOUT_S_MAX = 3600.0             # a broken post-copy reconnects within this
DISK_SYNC_TIMEOUT_S_MAX = 24 * 3600.0                # the disk copy reaches READY within this
SDPS_MAX_STUN_PCT_MIN, SDPS_MAX_STUN_PCT_MAX = 1, 99  # SDPS's ceiling: the share of each slice the vCPUs may lose
BREAKPOINTS_MAX = 8
BREAKPOINT_TIMEOUT_S_MAX = 900.0                     # the longest one breakpoint holds a move
BREAKPOINT_TIMEOUT_S_DEFAULT = 300.0
WORKLOAD_MAX_LEN = 200

ConvergeChoice = Literal["auto-converge", "auto", "autoconverge", "sdps", "postcopy", "post-copy", "adaptive", "off"]
CONVERGE_CHOICES: tuple[str, ...] = get_args(ConvergeChoice)
MirrorMode = Literal["write-blocking", "background-throttled"]
MIRROR_MODES: tuple[str, ...] = get_args(MirrorMode)
# the engine's named checkpoints (testbed.migration.state.FaultHook), where a relocate may be held (a breakpoint)
Checkpoint = Literal["precheck", "disk-sync:mirror-started", "memory-precopy:started", "switchover:held",
                     "postcopy:running", "verify"]
CHECKPOINTS: tuple[str, ...] = get_args(Checkpoint)

# the size and rate strings the units parser reads, as a pattern for the OpenAPI schema (the parser decides)
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([KMGTkmgt]?)([iI]?[bB])?\s*$"
RATE_PATTERN = r"^\s*\d+(\.\d+)?\s*([KMGTkmgt]?)(iB|B|bit|bps|IB|b|BIT|BPS)?(/s)?\s*$"
# hosts, datastores, port groups ("VM Network"), clusters, vCenters: printable, no path or shell characters
OBJECT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$"
HOSTNAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$"     # a DNS name or an IPv4 address
USER_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}$"


def _in_bounds(what: str, value: int, lo: int, hi: int, unit: str, fmt: Callable[[int], str]) -> int:
    if not lo <= value <= hi:
        raise ValueError(f"{what} {fmt(value)}: give {fmt(lo)} to {fmt(hi)}{unit}")
    return value


def _said(err: InputError) -> str:
    return f"{err.message} ({err.hint})" if err.hint else err.message


def _bytes(n: int) -> str:
    return f"{n} B" if n < 1024 or n % 1024 else format_bytes(n).replace(".0 ", " ")


def check_size(value: object, what: str, lo: int, hi: int) -> int:
    """``value`` (bytes, or "512M") as bytes within ``lo``-``hi``; ValueError (for pydantic) saying the rule."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{what}: give a number of bytes or a size like 512M (not {value!r})")
    try:
        n = value if isinstance(value, int) else parse_size(value, what=what)
    except InputError as err:
        raise ValueError(_said(err)) from None
    return _in_bounds(what, n, lo, hi, "", _bytes)


def check_rate(value: object, what: str, lo: int = BANDWIDTH_MIN, hi: int = BANDWIDTH_MAX) -> int:
    """``value`` (bytes/s, or "30MiB/s", "240Mbit") as bytes/s within ``lo``-``hi``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{what}: give bytes per second or a rate like 30MiB/s (not {value!r})")
    try:
        n = value if isinstance(value, int) else parse_rate_bytes(value, what=what)
    except InputError as err:
        raise ValueError(_said(err)) from None
    if n <= 0:
        raise ValueError(f"{what} {value!r}: give a rate above zero (or leave it out: the link's own)")
    return _in_bounds(what, n, lo, hi, " per second", lambda b: f"{b} B")


def _size_type(what: str, lo: int, hi: int, example: str) -> Any:
    schema = {"anyOf": [{"type": "integer", "minimum": lo, "maximum": hi},
                        {"type": "string", "pattern": SIZE_PATTERN, "maxLength": 32}],
              "description": f"{what}: bytes, or a size like {example} ({_bytes(lo)} to {_bytes(hi)})",
              "examples": [example]}
    return Annotated[StrictInt | Annotated[str, StringConstraints(max_length=32)],
                     AfterValidator(lambda v: check_size(v, what, lo, hi)), WithJsonSchema(schema)]


MemorySize = _size_type("memory", MEMORY_MIN, MEMORY_MAX, "512M")
DiskSize = _size_type("disk", DISK_MIN, DISK_MAX, "1G")
Bandwidth = Annotated[StrictInt | Annotated[str, StringConstraints(max_length=32)],
                      AfterValidator(lambda v: check_rate(v, "bandwidth")),
                      WithJsonSchema({"anyOf": [{"type": "integer", "minimum": BANDWIDTH_MIN,
                                                 "maximum": BANDWIDTH_MAX},
                                                {"type": "string", "pattern": RATE_PATTERN, "maxLength": 32}],
                                      "description": "bytes per second, or a rate like 30MiB/s or 240Mbit",
                                      "examples": ["30MiB/s"]})]


def _vm_name(v: str) -> str:
    try:
        return check_vm_name(v)
    except InputError as err:
        raise ValueError(_said(err)) from err


VmName = Annotated[str, StringConstraints(max_length=64), AfterValidator(_vm_name),
                   WithJsonSchema({"type": "string", "pattern": r"^[a-z][a-z0-9-]{0,30}$",
                                   "description": f"a VM name: {VM_NAME_RULE}"})]
ObjectName = Annotated[str, StringConstraints(pattern=OBJECT_NAME_PATTERN)]


def _library_item(v: str) -> str:
    if not item_name_ok(v):
        raise ValueError(f"{v!r} is not a content library item name ({ITEM_NAME_RULE}): add the file with "
                         "`testbed image add FILE --name NAME` and give NAME here (`testbed image list` shows them)")
    return v


# a VM's kernel, initrd or disk image: the name of an item of the vCenter's content library, never a path
LibraryItem = Annotated[str, StringConstraints(max_length=63), AfterValidator(_library_item),
                        WithJsonSchema({"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]{0,62}$",
                                        "description": f"a content library item: {ITEM_NAME_RULE}"})]
HostName = Annotated[str, StringConstraints(pattern=HOSTNAME_PATTERN, max_length=253)]
UserName = Annotated[str, StringConstraints(pattern=USER_PATTERN)]
Secret = Annotated[str, StringConstraints(max_length=1024)]

Vcpus = Annotated[StrictInt, Field(ge=VCPUS_MIN, le=VCPUS_MAX)]
Streams = Annotated[StrictInt, Field(ge=STREAMS_MIN, le=STREAMS_MAX)]
DowntimeLimitMs = Annotated[StrictInt, Field(ge=DOWNTIME_LIMIT_MS_MIN, le=DOWNTIME_LIMIT_MS_MAX)]
CompletionTimeoutS = Annotated[float, Field(gt=0, le=COMPLETION_TIMEOUT_S_MAX, allow_inf_nan=False)]
StallTimeoutS = Annotated[float, Field(gt=0, le=STALL_TIMEOUT_S_MAX, allow_inf_nan=False)]
PostcopyRecoveryTimeoutS = Annotated[float, Field(gt=0, le=POSTCOPY_RECOVERY_TIMEOUT_S_MAX, allow_inf_nan=False)]
DiskSyncTimeoutS = Annotated[float, Field(gt=0, le=DISK_SYNC_TIMEOUT_S_MAX, allow_inf_nan=False)]
SdpsMaxStunPct = Annotated[StrictInt, Field(ge=SDPS_MAX_STUN_PCT_MIN, le=SDPS_MAX_STUN_PCT_MAX)]
BreakpointTimeoutS = Annotated[float, Field(gt=0, le=BREAKPOINT_TIMEOUT_S_MAX, allow_inf_nan=False)]


def _once_each(v: list[str]) -> list[str]:
    twice = sorted({n for n in v if v.count(n) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} given more than once: a move holds at each checkpoint at most once")
    return v


# where the engine holds a relocate until `testbed task continue` (or its breakpoint_timeout_s)
Breakpoints = Annotated[list[Checkpoint], Field(max_length=BREAKPOINTS_MAX, json_schema_extra={"uniqueItems": True}),
                        AfterValidator(_once_each)]


def _power_of_two(v: int) -> int:
    if v & (v - 1):
        raise ValueError(f"mirror_granularity {v}: QEMU takes a power of 2 (512 B to 64 MiB)")
    return v


MirrorGranularity = Annotated[StrictInt, Field(ge=GRANULARITY_MIN, le=GRANULARITY_MAX),
                              AfterValidator(_power_of_two)]


def _converge(v: str) -> str:
    try:
        return normalize(v)
    except InputError as err:     # not reached: the Literal admits only known spellings
        raise ValueError(err.message) from None


Converge = Annotated[ConvergeChoice, AfterValidator(_converge)]


def _workload(v: str) -> str:
    try:
        parse_workload(v)
    except InputError as err:
        raise ValueError(_said(err)) from None
    return v


Workload = Annotated[str, StringConstraints(max_length=WORKLOAD_MAX_LEN), AfterValidator(_workload),
                     Field(description="idle | memory:RATE[@WSS] | disk:RATE, comma-joined")]


# --- the same rules for argparse (testbed vm create, relocate, migrate) -----------------------------
def _argtype(fn: Callable[[str], object], what: str) -> Callable[[str], Any]:
    import argparse

    def conv(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    conv.__name__ = what     # argparse names the type in its "invalid ... value" message
    return conv


def _int_in(what: str, lo: int, hi: int) -> Callable[[str], int]:
    def conv(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"{what} {text!r}: give a whole number") from None
        return _in_bounds(what, n, lo, hi, "", str)
    return conv


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise ValueError(f"completion timeout {text!r}: give seconds") from None
    if not 0 < s <= COMPLETION_TIMEOUT_S_MAX:      # also refuses nan and inf
        raise ValueError(f"completion timeout {text}: give more than 0 and at most {COMPLETION_TIMEOUT_S_MAX:.0f} s")
    return s


def _size_arg(what: str, lo: int, hi: int) -> Callable[[str], int]:
    return lambda text: check_size(text.strip(), what, lo, hi)


arg_memory = _argtype(_size_arg("memory", MEMORY_MIN, MEMORY_MAX), "memory size")
arg_disk = _argtype(_size_arg("disk", DISK_MIN, DISK_MAX), "disk size")
arg_bandwidth = _argtype(lambda t: check_rate(t.strip(), "--bandwidth"), "rate")
arg_vcpus = _argtype(_int_in("--vcpus", VCPUS_MIN, VCPUS_MAX), "vCPU count")
arg_streams = _argtype(_int_in("--streams", STREAMS_MIN, STREAMS_MAX), "stream count")
arg_downtime_limit = _argtype(_int_in("--downtime-limit", DOWNTIME_LIMIT_MS_MIN, DOWNTIME_LIMIT_MS_MAX),
                              "downtime limit")
arg_completion_timeout = _argtype(_seconds, "completion timeout")
arg_workload = _argtype(_workload, "workload")
arg_vm_name = _argtype(_vm_name, "VM name")
