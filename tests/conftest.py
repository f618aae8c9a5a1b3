"""Fixtures for the lab tests (pyroute2-style: each fixture that creates something removes it).

- ``lab_env`` (session): a private $TESTBED_HOME under pytest's tmp dir, so tests never
  touch a lab the user has up; skips with the reason when root, QEMU or the guest image
  is missing.
- ``lab`` (module): a two-site lab with a unique name and its two vCenters, up for the
  module's tests, taken down after them; depends on ``lab_env``.
- ``vms`` (function): the VMs of ``lab`` through its vCenters (``testbed.vcenter.labvms.LabVms``); the VMs the
  test created are deleted through them afterwards. Helpers the lab tests share are in ``tests/lab/labkit.py``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from testbed.paths import GUEST_IMAGE_DIR
from testbed.vcenter.labvms import LabVms

from .lab.labkit import lab_vms


def lab_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces); run `make test` as root"
    for tool in ("qemu-system-x86_64", "qemu-img", "ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; run `make setup`"
    if not Path("/usr/sbin/sshd").exists():
        return "openssh-server is not installed; run `make setup`"
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    if "version 7." in out:
        return "QEMU 7.2 corrupts migrating guests under TCG; install QEMU from bookworm-backports (`make setup`)"
    if not (GUEST_IMAGE_DIR / "vmlinuz").exists():
        return "the guest image is not built; run `make image`"
    return None


def unique_lab_name() -> str:
    return "t" + secrets.token_hex(3)


@pytest.fixture(scope="session")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("testbed-home")
    old = os.environ.get("TESTBED_HOME")
    os.environ["TESTBED_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("TESTBED_HOME", None)
    else:
        os.environ["TESTBED_HOME"] = old


@pytest.fixture(scope="module")
def lab(lab_env: Path) -> Iterator[str]:
    from testbed import labctl
    from testbed.lab.topology import default_topology
    from testbed.vcenter import deploy
    name = unique_lab_name()
    try:
        asyncio.run(deploy.up(default_topology(name)))
        yield name
    finally:
        labctl.down(name)


@pytest.fixture
async def vms(lab: str) -> AsyncIterator[LabVms]:
    async with lab_vms(lab) as m:
        yield m
