"""Sizes, rates and workload specs as users type them."""

import pytest

from testbed.errors import InputError
from testbed.guest.workload import Workload, agent_cmdline, parse_workload
from testbed.units import parse_rate_bytes, parse_size


@pytest.mark.parametrize("text,value", [("512M", 512 * 2**20), ("1G", 2**30), ("2GiB", 2 * 2**30),
                                        ("4096", 4096), ("1.5K", 1536)])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text,value", [("20MB/s", 20_000_000), ("20MiB/s", 20 * 2**20),
                                        ("100Mbit", 12_500_000), ("1Gbit", 125_000_000), ("500", 500)])
def test_rates(text: str, value: int) -> None:
    assert parse_rate_bytes(text) == value


def test_bad_size_says_how_to_write_it() -> None:
    with pytest.raises(InputError, match="512M"):
        parse_size("lots")


def test_workload_specs() -> None:
    assert parse_workload("idle") == Workload()
    w = parse_workload("memory:20MB/s@256M,disk:5MB/s")
    assert (w.mem_rate_bps, w.mem_wss_bytes, w.disk_rate_bps) == (20_000_000, 256 * 2**20, 5_000_000)
    assert parse_workload(w.describe()) == w
    c = parse_workload("memory:60MB/s@48M,cpu-bound")
    assert c.mem_cpu_bound and c.mem_rate_bps == 60_000_000 and parse_workload(c.describe()) == c
    assert not w.mem_cpu_bound
    assert "tb.mem_mode=cpu" in agent_cmdline("v", None, None, c, 256 * 2**20).split()
    assert "tb.mem_mode=cpu" not in agent_cmdline("v", None, None, w, 512 * 2**20)


@pytest.mark.parametrize("bad", ["cpu:100", "memory", "memory:fast", "disk:", "cpu-bound", "idle,cpu-bound",
                                 "memory:1MB/s,cpu-bound:2"])
def test_bad_workload(bad: str) -> None:
    with pytest.raises(InputError, match="workload"):
        parse_workload(bad)


def test_agent_cmdline_carries_the_workload() -> None:
    line = agent_cmdline("web01", "198.19.1.1/16", "198.19.0.2:7000",
                         parse_workload("memory:20MB/s@64M,disk:1MB/s"), 512 * 2**20)
    for part in ("console=ttyS0", "tb.vm=web01", "tb.ip=198.19.1.1/16", "tb.observer=198.19.0.2:7000",
                 "tb.mem_rate=20000000", f"tb.mem_wss={64 * 2**20}", "tb.disk_rate=1000000"):
        assert part in line.split()


def test_working_set_must_fit_in_memory() -> None:
    with pytest.raises(InputError, match="does not fit"):
        agent_cmdline("v", None, None, parse_workload("memory:1MB/s@500M"), 512 * 2**20)


@pytest.mark.parametrize("extra", ["tb.vm=web01", "quiet tb.ip=198.19.16.3/16", "tb.observer=198.19.0.9:7000",
                                   "tb.mem_rate=1"])
def test_a_builtin_guest_cannot_be_given_another_identity(extra: str) -> None:
    """A user's extra kernel arguments cannot rename the built-in guest or move its address (issue 17): its
    heartbeats would speak for another VM."""
    with pytest.raises(InputError, match="own parameters"):
        agent_cmdline("spoof", "198.19.16.9/16", "198.19.0.2:7000", parse_workload("idle"), 256 * 2**20, extra)
    assert "quiet" in agent_cmdline("ok", None, None, parse_workload("idle"), 256 * 2**20, "quiet")


def test_a_builtin_guest_keeps_its_tuning_parameters() -> None:
    """The agent's tuning parameters are not its identity: `testbed bench` sets tb.disk_span on its disk VM."""
    line = agent_cmdline("ok", None, None, parse_workload("disk:4MB/s"), 256 * 2**20,
                         "tb.disk_span=16777216 tb.hb_us=2000")
    assert line.endswith("tb.disk_span=16777216 tb.hb_us=2000") and "tb.vm=ok" in line
