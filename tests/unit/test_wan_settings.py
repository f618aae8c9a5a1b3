"""Link and TCP settings as people write them, and the buffer sizing rule (no lab needed)."""

from __future__ import annotations

import pytest

from testbed.errors import InputError
from testbed.lab.topology import HostSpec, LinkSpec
from testbed.net import wan
from testbed.units import parse_duration_us, parse_ppm


def test_durations_and_percentages() -> None:
    assert parse_duration_us("100ms") == 100_000
    assert parse_duration_us("250us") == 250
    assert parse_duration_us("0.5s") == 500_000
    assert parse_duration_us("20") == 20_000          # a bare number is milliseconds
    assert parse_ppm("0.1%") == 1000 and parse_ppm("1") == 10_000
    with pytest.raises(InputError):
        parse_duration_us("fast")
    with pytest.raises(InputError):
        parse_ppm("150%")


def test_link_in_yaml_terms() -> None:
    link = LinkSpec.model_validate({"rtt": "100ms", "jitter": "1ms", "loss": "0.1%", "bandwidth": "1Gbit",
                                    "mtu": 9000})
    assert (link.delay_us, link.jitter_us, link.loss_ppm, link.bandwidth_bps) == (50_000, 1000, 1000, 125_000_000)
    assert LinkSpec.model_validate({"delay": "30ms"}).delay_us == 30_000
    with pytest.raises(ValueError, match="either rtt or delay"):
        LinkSpec.model_validate({"rtt": "10ms", "delay": "5ms"})


def test_host_tcp_buffers_setting() -> None:
    assert HostSpec(name="esx-a1").tcp_buffers == "auto"
    assert HostSpec(name="esx-a1", tcp_buffers="64M").tcp_buffers == "64M"
    with pytest.raises(InputError):
        HostSpec(name="esx-a1", tcp_buffers="lots")


def test_auto_buffers_are_twice_the_bdp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wan, "kernel_tcp_buffers", lambda: ([4096, 131072, 6 * 2**20], [4096, 16384, 4 * 2**20]))
    gbit_100ms = wan.Shape(delay_us=50_000, bandwidth_bps=125_000_000)
    assert wan.tcp_buffer_max("auto", gbit_100ms) == 25_000_000
    assert wan.tcp_buffer_max("auto", wan.Shape()) is None                         # no delay: the kernel's
    assert wan.tcp_buffer_max("auto", wan.Shape(delay_us=100_000)) == wan.MAX_AUTO_BUFFER  # uncapped: bounded
    assert wan.tcp_buffer_max("kernel", gbit_100ms) is None
    assert wan.tcp_buffer_max("64M", wan.Shape()) == 64 * 2**20
