"""Sizes and rates as people write them ("512M", "1G", "20MB/s", "100Mbit").

Binary suffixes for sizes (K, M, G, T = 1024^n, also KiB/MiB/...); for rates,
``MB/s`` is 10^6 bytes per second (what guests and dd report), ``MiB/s`` 2^20,
and bit rates (``Mbit``, ``Gbit``) are 10^6/10^9 bits per second.
"""

from __future__ import annotations

import re

from testbed.errors import InputError

# the largest byte count (and rate) anything here takes: QEMU's sizes and rates are signed 64-bit
MAX_BYTES = 2**63 - 1
MAX_DURATION_US = 10**15          # about 31 years


def _whole(value: object, what: str, kind: str, example: str) -> int:
    """An integer argument as given (bytes, bytes/s): a whole, non-negative number that fits, else InputError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what}: cannot read {value!r} as a {kind}", hint=f"write it like {example}")
    if value < 0:
        raise InputError(f"{what}: {value} is negative", hint=f"give a {kind} of zero or more, like {example}")
    if value > MAX_BYTES:
        raise InputError(f"{what}: {value} is too large (at most {MAX_BYTES})", hint=f"write it like {example}")
    return value


def _fits(value: float, what: str, text: str, kind: str) -> int:
    if not value <= MAX_BYTES:       # also inf (a number too long for a float)
        raise InputError(f"{what}: {text!r} is too large for a {kind} (at most {MAX_BYTES} bytes)")
    return int(value)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE | re.ASCII)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(iB|B|bit|bps)?(?:/s)?\s*$", re.IGNORECASE | re.ASCII)
_POW = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Parse a size into bytes: ``512M`` = 512 MiB, ``1G``, ``4096``, ``2GiB``."""
    if not isinstance(text, str):
        return _whole(text, what, "size", "512M, 1G or a number of bytes")
    m = _SIZE.match(text)
    if not m:
        raise InputError(f"{what}: cannot read {text!r} as a size",
                         hint="write it like 512M, 1G, 2GiB or a number of bytes")
    return _fits(float(m.group(1)) * 1024 ** _POW[m.group(2).upper()], what, text, "size")


def parse_rate_bytes(text: str | int, *, what: str = "rate") -> int:
    """Parse a rate into bytes per second.

    ``20MB/s`` = 20e6 B/s, ``20MiB/s`` = 20*2^20 B/s, ``100Mbit`` = 12.5e6 B/s.
    """
    if not isinstance(text, str):
        return _whole(text, what, "rate", "20MB/s, 100MiB/s, 1Gbit or bytes per second")
    m = _RATE.match(text)
    if not m:
        raise InputError(f"{what}: cannot read {text!r} as a rate",
                         hint="write it like 20MB/s, 100MiB/s, 1Gbit or bytes per second")
    number, prefix, unit = float(m.group(1)), m.group(2).upper(), (m.group(3) or "B").lower()
    if unit == "ib":
        return _fits(number * 1024 ** _POW[prefix], what, text, "rate")
    scale = 1000 ** _POW[prefix]
    if unit in ("bit", "bps"):
        return _fits(number * scale / 8, what, text, "rate")
    return _fits(number * scale, what, text, "rate")


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s)?\s*$", re.IGNORECASE | re.ASCII)
_DUR_SCALE = {"us": 1, "µs": 1, "ms": 1000, "s": 1_000_000}


def parse_duration_us(text: str | int | float, *, what: str = "duration") -> int:
    """Parse a duration into microseconds: ``100ms``, ``250us``, ``0.5s``; a bare number is milliseconds."""
    hint = "write it like 100ms, 250us or 0.5s (a bare number is milliseconds)"
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise InputError(f"{what}: cannot read {text!r} as a duration", hint=hint)
    if isinstance(text, str):
        m = _DURATION.match(text)
        if not m:
            raise InputError(f"{what}: cannot read {text!r} as a duration", hint=hint)
        us = float(m.group(1)) * _DUR_SCALE[(m.group(2) or "ms").lower()]
    else:
        us = float(text) * 1000
    if not 0 <= us <= MAX_DURATION_US:          # negative, too long, nan
        raise InputError(f"{what}: {text!r} is not a duration from 0 to {MAX_DURATION_US // 10**6} s", hint=hint)
    return int(round(us))


def parse_ppm(text: str | int | float, *, what: str = "loss") -> int:
    """Parse a probability into parts per million: ``0.1%`` = 1000 ppm; a bare number is percent."""
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise InputError(f"{what}: cannot read {text!r} as a percentage", hint="write it like 0.1% or 1%")
    if not isinstance(text, str):
        value = float(text)
    else:
        m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*%?\s*$", text, re.ASCII)
        if not m:
            raise InputError(f"{what}: cannot read {text!r} as a percentage", hint="write it like 0.1% or 1%")
        value = float(m.group(1))
    if not 0 <= value <= 100:
        raise InputError(f"{what}: {text!r} is not between 0% and 100%")
    return int(round(value * 10_000))
