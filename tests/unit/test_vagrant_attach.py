"""`lab attach --vagrant` reads Vagrant's own output: machine states and ssh-config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testbed.errors import InputError
from testbed.vcenter.attach import machine_states, parse_ssh_config

STATUS = """1795812000,esx-a1,metadata,provider,libvirt
1795812000,esx-a1,provider-name,libvirt
1795812000,esx-a1,state,running
1795812000,esx-a1,state-human-short,running
1795812000,esx-b1,state,shutoff
1795812000,,ui,info,Current machine states:
"""

SSH_CONFIG = """Host esx-a1
  HostName 198.18.250.11
  User root
  Port 22
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  IdentityFile "/work/main/.vagrant/machines/esx-a1/libvirt/private_key"
  IdentitiesOnly yes

Host esx-b1
  HostName 198.18.250.21
  User root
  Port 2222
"""


def test_machine_states() -> None:
    assert machine_states(STATUS) == {"esx-a1": "running", "esx-b1": "shutoff"}


def test_ssh_config() -> None:
    e = parse_ssh_config(SSH_CONFIG)
    assert set(e) == {"esx-a1", "esx-b1"}
    assert e["esx-a1"].hostname == "198.18.250.11" and e["esx-a1"].port == 22 and e["esx-a1"].user == "root"
    assert e["esx-a1"].identity_file == "/work/main/.vagrant/machines/esx-a1/libvirt/private_key"
    assert e["esx-b1"].port == 2222 and e["esx-b1"].identity_file is None


def test_ssh_config_without_hostname() -> None:
    with pytest.raises(InputError, match="esx-a1 has no HostName"):
        parse_ssh_config("Host esx-a1\n  User root\n")


def test_a_silent_vagrant_hang_ends_at_the_time_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`vagrant up` once sat for minutes printing nothing: the streamed run must still end at its limit, with
    Vagrant's process group stopped and an error that says what to do."""
    import time

    from testbed import vagrant_lab
    from testbed.errors import LabError
    fake = tmp_path / "vagrant"
    fake.write_text("#!/bin/sh\necho starting\nsleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    t0 = time.monotonic()
    with pytest.raises(LabError, match="did not finish within 1 s") as err:
        vagrant_lab._vagrant(tmp_path, "up", timeout_s=1, stream=True)
    assert time.monotonic() - t0 < 10
    assert "lab vagrant down" in (err.value.hint or "")
