"""Properties of the size, rate and duration parsers (testbed.units), checked with hypothesis over many inputs:
what is written with a unit reads back as that many bytes (or bytes/s, microseconds); bigger in, bigger out;
anything else, garbage, negatives, overflow, nan, is an InputError and never another exception. Deterministic
(derandomized, no example database), a few hundred examples each."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.errors import InputError
from testbed.units import (
    MAX_BYTES,
    MAX_DURATION_US,
    format_bytes,
    parse_duration_us,
    parse_ppm,
    parse_rate_bytes,
    parse_size,
)
from testbed.vcenter.limits import DISK_MAX, DISK_MIN, check_rate, check_size

settings.register_profile("units", derandomize=True, database=None, deadline=None, max_examples=300)
settings.load_profile("units")

POW = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
small = st.integers(min_value=0, max_value=2**20)
prefix = st.sampled_from(list(POW))
near_sizes = st.from_regex(r"\A-?\d{0,400}(\.\d*)?\s*[KMGTkmgt]?i?[Bb]?\Z")    # huge, negative, odd digits
anything = st.one_of(st.text(max_size=40), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(),
                     st.lists(st.integers(), max_size=2), near_sizes)


def read(fn, value):  # type: ignore[no-untyped-def]
    """``fn(value)``, or None when it refused with InputError (any other exception fails the test)."""
    try:
        return fn(value)
    except InputError:
        return None


@given(n=small, p=prefix, spelling=st.sampled_from(["", "B", "iB", "ib", "b"]), lower=st.booleans())
def test_a_size_with_a_unit_reads_back_as_that_many_bytes(n: int, p: str, spelling: str, lower: bool) -> None:
    if not p and spelling.strip().lower() == "ib":
        spelling = "B"     # "5iB" is not a size; "5B" is
    text = f"{n}{p.lower() if lower else p}{spelling}"
    assert parse_size(text) == n * 1024 ** POW[p]
    assert parse_size(n * 1024 ** POW[p]) == n * 1024 ** POW[p]


@given(a=st.floats(0, 1e6), b=st.floats(0, 1e6), p=prefix)
def test_sizes_and_rates_grow_with_the_number_and_the_unit(a: float, b: float, p: str) -> None:
    lo, hi = sorted((round(a, 3), round(b, 3)))
    assert parse_size(f"{lo}{p}") <= parse_size(f"{hi}{p}")
    assert parse_rate_bytes(f"{lo}{p}B/s") <= parse_rate_bytes(f"{hi}{p}B/s")
    if p != "T" and hi >= 1:
        nxt = "KMGT"["KMGT".index(p) + 1] if p else "K"
        assert parse_size(f"{hi}{p}") < parse_size(f"{hi}{nxt}")


@given(n=st.integers(0, 2**40))
def test_format_bytes_reads_back_within_its_rounding(n: int) -> None:
    back = parse_size(format_bytes(n))
    assert abs(back - n) <= max(1, 0.05 * n), (n, format_bytes(n), back)


@given(n=small, p=prefix)
def test_rates_decimal_binary_and_bits(n: int, p: str) -> None:
    assert parse_rate_bytes(f"{n}{p}B/s") == n * 1000 ** POW[p]
    assert parse_rate_bytes(f"{n}{p}iB/s") == n * 1024 ** POW[p]
    assert parse_rate_bytes(f"{8 * n}{p}bit") == n * 1000 ** POW[p]
    assert parse_rate_bytes(f"{8 * n}{p}bps") == parse_rate_bytes(f"{n}{p}B")
    assert parse_rate_bytes(n) == n


@given(n=st.integers(0, 10**6))
def test_durations_in_every_unit_agree(n: int) -> None:
    assert parse_duration_us(f"{n}ms") == parse_duration_us(n) == parse_duration_us(f"{n * 1000}us") == n * 1000
    assert parse_duration_us(f"{n}s") == n * 10**6
    assert parse_duration_us(f"{n}µs") == n


@given(a=st.floats(0, 1e6), b=st.floats(0, 1e6), unit=st.sampled_from(["us", "ms", "s", ""]))
def test_durations_grow_with_the_number(a: float, b: float, unit: str) -> None:
    lo, hi = sorted((round(a, 3), round(b, 3)))
    assert parse_duration_us(f"{lo}{unit}") <= parse_duration_us(f"{hi}{unit}")


@given(value=anything)
def test_any_input_is_a_number_in_range_or_an_input_error(value: object) -> None:
    for fn, top in ((parse_size, MAX_BYTES), (parse_rate_bytes, MAX_BYTES), (parse_duration_us, MAX_DURATION_US),
                    (parse_ppm, 10**6)):
        got = read(fn, value)
        assert got is None or (type(got) is int and 0 <= got <= top), (fn.__name__, value, got)


@given(n=st.integers(max_value=-1))
def test_negatives_are_refused(n: int) -> None:
    for fn in (parse_size, parse_rate_bytes, parse_duration_us):
        with pytest.raises(InputError):
            fn(n)
        with pytest.raises(InputError):
            fn(str(n))


@pytest.mark.parametrize("value", [True, False, math.nan, math.inf, -math.inf, "1e9", "0x10", "٣M", "1,5G",
                                   "9" * 400, "9" * 400 + "T", "12 34", "", " ", "M", "-0.5s", None, [1]])
def test_garbage_is_an_input_error(value: object) -> None:
    for fn in (parse_size, parse_rate_bytes):
        with pytest.raises(InputError):
            fn(value)    # type: ignore[arg-type]


@given(value=anything)
def test_the_api_limits_give_a_size_within_bounds_or_a_value_error(value: object) -> None:
    # what pydantic turns into a 400: never another exception, never a size out of bounds
    for fn in (lambda v: check_size(v, "disk", DISK_MIN, DISK_MAX), lambda v: check_rate(v, "bandwidth")):
        try:
            n = fn(value)
        except ValueError:
            continue
        assert type(n) is int and n > 0
    try:
        assert DISK_MIN <= check_size(value, "disk", DISK_MIN, DISK_MAX) <= DISK_MAX
    except ValueError:
        pass
