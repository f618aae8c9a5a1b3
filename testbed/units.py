"""Sizes and rates as people write them ("512M", "1G", "20MB/s", "100Mbit").

Binary suffixes for sizes (K, M, G, T = 1024^n, also KiB/MiB/...); for rates,
``MB/s`` is 10^6 bytes per second (what guests and dd report), ``MiB/s`` 2^20,
and bit rates (``Mbit``, ``Gbit``) are 10^6/10^9 bits per second.
"""

from __future__ import annotations

import re

from testbed.errors import InputError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(iB|B|bit|bps)?(?:/s)?\s*$", re.IGNORECASE)
_POW = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Parse a size into bytes: ``512M`` = 512 MiB, ``1G``, ``4096``, ``2GiB``."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise InputError(f"{what}: cannot read {text!r} as a size",
                         hint="write it like 512M, 1G, 2GiB or a number of bytes")
    value = float(m.group(1)) * 1024 ** _POW[m.group(2).upper()]
    return int(value)


def parse_rate_bytes(text: str | int, *, what: str = "rate") -> int:
    """Parse a rate into bytes per second.

    ``20MB/s`` = 20e6 B/s, ``20MiB/s`` = 20*2^20 B/s, ``100Mbit`` = 12.5e6 B/s.
    """
    if isinstance(text, int):
        return text
    m = _RATE.match(text)
    if not m:
        raise InputError(f"{what}: cannot read {text!r} as a rate",
                         hint="write it like 20MB/s, 100MiB/s, 1Gbit or bytes per second")
    number, prefix, unit = float(m.group(1)), m.group(2).upper(), (m.group(3) or "B").lower()
    if unit == "ib":
        return int(number * 1024 ** _POW[prefix])
    scale = 1000 ** _POW[prefix]
    if unit in ("bit", "bps"):
        return int(number * scale / 8)
    return int(number * scale)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s)?\s*$", re.IGNORECASE)
_DUR_SCALE = {"us": 1, "µs": 1, "ms": 1000, "s": 1_000_000}


def parse_duration_us(text: str | int | float, *, what: str = "duration") -> int:
    """Parse a duration into microseconds: ``100ms``, ``250us``, ``0.5s``; a bare number is milliseconds."""
    if isinstance(text, int | float):
        return int(round(text * 1000))
    m = _DURATION.match(text)
    if not m:
        raise InputError(f"{what}: cannot read {text!r} as a duration",
                         hint="write it like 100ms, 250us or 0.5s (a bare number is milliseconds)")
    return int(round(float(m.group(1)) * _DUR_SCALE[(m.group(2) or "ms").lower()]))


def parse_ppm(text: str | int | float, *, what: str = "loss") -> int:
    """Parse a probability into parts per million: ``0.1%`` = 1000 ppm; a bare number is percent."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*%?\s*$", text)
        if not m:
            raise InputError(f"{what}: cannot read {text!r} as a percentage", hint="write it like 0.1% or 1%")
        value = float(m.group(1))
    if not 0 <= value <= 100:
        raise InputError(f"{what}: {text!r} is not between 0% and 100%")
    return int(round(value * 10_000))
