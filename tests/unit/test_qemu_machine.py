"""The VMM layer's machine (``testbed.qemu.machine.QemuMachine``) with a stand-in for QEMU: a small program
that takes the argv ``build_cmdline`` built, connects to the monitor socket that argv names and speaks QMP.
What it answers to ``quit`` and SIGTERM is set per test, so each step of the escalating shutdown is made to
happen. No root (the VM has no NIC, so no tap), no guest."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

from testbed.errors import QemuError
from testbed.qemu.cmdline import VmPaths
from testbed.qemu.machine import QemuMachine
from testbed.qemu.spec import BootSpec, VmSpec

FAKE_QEMU = r'''
import json, os, signal, socket, sys, time
mode = os.environ["FAKE_QEMU_MODE"]
argv = sys.argv[1:]
open(os.environ["FAKE_QEMU_ARGV"], "w").write(json.dumps(argv))
if mode == "die":
    sys.exit(3)
i = argv.index("-chardev")
while "id=qmp0" not in argv[i + 1]:
    i = argv.index("-chardev", i + 1)
assert argv[argv.index("-mon") + 1] == "chardev=qmp0,mode=control"
path = dict(kv.split("=", 1) for kv in argv[i + 1].split(",")[1:])["path"]
if mode in ("stubborn", "deaf"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "deaf" else lambda *a: sys.exit(0))
s = socket.socket(socket.AF_UNIX)
s.connect(path)
send = lambda msg: s.sendall((json.dumps(msg) + "\n").encode())
send({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}, "capabilities": []}})
buf, dec = "", json.JSONDecoder()
while True:                           # QMP is a stream of JSON objects, not lines
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk.decode()
    while buf.strip():
        try:
            cmd, end = dec.raw_decode(buf.lstrip())
        except ValueError:
            break
        buf = buf.lstrip()[end:]
        ex = cmd.get("execute")
        if ex == "quit" and mode == "obedient":
            send({"return": {}, "id": cmd.get("id")})
            sys.exit(0)
        if ex == "quit":
            continue                  # stubborn and deaf: ignore quit (a hung QEMU)
        send({"return": {"status": "running"} if ex == "query-status" else {}, "id": cmd.get("id")})
        if ex == "qmp_capabilities":
            send({"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}})
'''


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    p = tmp_path / "qemu-system-x86_64"
    p.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def machine(tmp_path: Path, fake: Path, mode: str, monkeypatch: pytest.MonkeyPatch,
            events: list[dict] | None = None, exits: list[int | None] | None = None) -> QemuMachine:  # type: ignore[type-arg]
    monkeypatch.setenv("FAKE_QEMU_MODE", mode)
    monkeypatch.setenv("FAKE_QEMU_ARGV", str(tmp_path / "argv.json"))
    spec = VmSpec(name="m1", memory_bytes=64 * 2**20, boot=BootSpec(kernel="/k"), nics=())
    return QemuMachine(spec, VmPaths(tmp_path / "run"), [], host="unit", qemu_binary=str(fake), accel="tcg",
                       on_event=None if events is None else events.append,
                       on_exit=None if exits is None else exits.append)


async def test_the_argv_that_runs_names_the_monitor_socket_and_quit_stops_it(
        tmp_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[dict] = []  # type: ignore[type-arg]
    exits: list[int | None] = []
    m = machine(tmp_path, fake_qemu, "obedient", monkeypatch, events, exits)
    async with m:
        assert m.alive
        assert await m.execute("query-status") == {"status": "running"}
        for _ in range(250):            # up to 5 s: the event is queued at once; a loaded machine delays the pump
            if events:
                break
            await asyncio.sleep(0.02)
        assert events and events[0]["event"] == "RESUME" and "monotonic_s" in events[0]
        pid = m.proc.pid if m.proc else 0
    assert not m.alive and exits == [0]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    ran = (tmp_path / "argv.json").read_text()
    assert str(tmp_path / "run" / "qmp.sock") in ran, "the program ran with the argv build_cmdline made"


async def test_a_qemu_that_ignores_quit_is_terminated(tmp_path: Path, fake_qemu: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    m = machine(tmp_path, fake_qemu, "stubborn", monkeypatch)
    await m.start()
    assert await m.stop(timeout_s=0.5) == "terminated (SIGTERM after quit timed out)"
    assert not m.alive


async def test_a_qemu_that_ignores_sigterm_is_killed(tmp_path: Path, fake_qemu: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    m = machine(tmp_path, fake_qemu, "deaf", monkeypatch)
    await m.start()
    assert await m.stop(timeout_s=0.5, term_timeout_s=0.5) == "killed (SIGKILL)"
    assert not m.alive and m.returncode == -9


async def test_a_qemu_that_dies_at_launch_says_so_with_its_command_line(
        tmp_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = machine(tmp_path, fake_qemu, "die", monkeypatch)
    with pytest.raises(QemuError, match=r"exited before its monitor connected \(exit code 3\)") as e:
        await m.start()
    assert "command: " in e.value.message and "qmp0" in e.value.message
    assert not m.alive
    with pytest.raises(QemuError, match="not running"):
        await m.execute("query-status")
