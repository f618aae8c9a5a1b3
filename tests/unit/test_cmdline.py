"""QEMU command lines: what both ends of a migration must agree on comes from the spec."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from testbed.qemu.cmdline import VmPaths, build_cmdline, tap_name
from testbed.qemu.spec import BootSpec, DiskSpec, NicSpec, VmSpec


def spec(**kw: object) -> VmSpec:
    base: dict[str, object] = dict(
        name="web01", memory_bytes=512 * 2**20, machine="pc-q35-10.0",
        boot=BootSpec(kernel="/k", initrd="/i", append="console=ttyS0"),
        disks=(DiskSpec(datastore="ds1", file="web01-disk0.qcow2", size_bytes=2**30),),
        nics=(NicSpec(port_group="VM Network", mac="52:54:00:12:34:56"),))
    base.update(kw)
    return VmSpec.model_validate(base)


def test_direct_kernel_boot_with_disk_and_nic(tmp_path: Path) -> None:
    argv = build_cmdline(spec(), VmPaths(tmp_path), [tmp_path / "d.qcow2"])
    joined = " ".join(argv)
    assert argv[argv.index("-machine") + 1] == "pc-q35-10.0"
    assert argv[argv.index("-accel") + 1].startswith("tcg")
    assert argv[argv.index("-m") + 1] == "512M"
    assert "-kernel /k" in joined and "-initrd /i" in joined
    assert f"driver=file,filename={tmp_path / 'd.qcow2'},node-name=disk0-file" in joined
    assert "virtio-blk-pci,drive=disk0,id=disk0-dev" in joined
    assert f"tap,id=net0,ifname={tap_name('web01', 0)}" in joined
    assert "mac=52:54:00:12:34:56" in joined
    assert "-incoming" not in argv and "-S" not in argv
    assert f"path={tmp_path / 'serial.log'}" in joined


def test_incoming_starts_paused_and_deferred(tmp_path: Path) -> None:
    argv = build_cmdline(spec(), VmPaths(tmp_path), [tmp_path / "d"], incoming=True)
    assert argv[-3:] == ["-S", "-incoming", "defer"]


def test_boot_from_users_image(tmp_path: Path) -> None:
    s = spec(boot=BootSpec(from_disk=True))
    argv = build_cmdline(s, VmPaths(tmp_path), [tmp_path / "img.qcow2"])
    assert "-kernel" not in argv
    assert any("bootindex=0" in a for a in argv)


def test_tap_names_fit_linux_limit() -> None:
    assert len(tap_name("a-very-long-vm-name-indeed", 3)) <= 15


@pytest.mark.parametrize("bad", [dict(name="Web_01"), dict(memory_bytes=1024),
                                 dict(boot=BootSpec(kernel="/k"), disks=(), nics=({"port_group": "x",
                                                                                   "mac": "aa:bb"},))])
def test_bad_specs_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        spec(**bad)


def test_boot_needs_exactly_one_source() -> None:
    with pytest.raises(ValidationError):
        BootSpec(kernel="/k", from_disk=True)
    with pytest.raises(ValidationError):
        BootSpec()


def test_the_switchover_trace_is_on_and_parsed(tmp_path: Path) -> None:
    from testbed.bench.results import STEPS, breakdown
    from testbed.qemu.cmdline import downtime_checkpoints
    argv = build_cmdline(spec(), VmPaths(tmp_path), [tmp_path / "d.qcow2"])
    assert f"enable=vmstate_downtime_checkpoint,file={tmp_path / 'downtime-trace.log'}" in argv
    text = ("2026-12-02T17:00:00.000000Z qemu-system-x86_64: some warning\n"
            "1234@1764694800.100000:vmstate_downtime_checkpoint src-downtime-start\n"
            "1234@1764694800.101500:vmstate_downtime_checkpoint src-vm-stopped\n"
            "1234@1764694800.120000:vmstate_downtime_checkpoint src-iterable-saved\n"
            "1234@1764694800.121000:vmstate_downtime_checkpoint src-non-iterable-saved\n"
            "77@1764694800.140000:vmstate_downtime_checkpoint dst-precopy-loadvm-completed\n")
    cp = downtime_checkpoints(text, 1764694700.0)        # realtime - monotonic
    assert cp["src-downtime-start"] == pytest.approx(100.1) and cp["dst-precopy-loadvm-completed"] == \
        pytest.approx(100.14)
    steps = breakdown(cp, {"heartbeat_gap_start_s": 100.099, "resumed_s": 100.150, "heartbeat_gap_end_s": 100.210})
    assert [label for label, _, _ in STEPS if not label.startswith("  of which")] == list(steps)
    assert sum(steps.values()) == pytest.approx(111.0, abs=0.2)     # the steps add up to the outage
    assert steps["stopping the vCPUs"] == pytest.approx(1.5)
