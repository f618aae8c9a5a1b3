"""Fixtures of the unit tests (no root, no lab): ``vc``, a real ``VCenter`` on a temporary directory (its
inventory, certificate, keys), closed after the test; ``lab``, a real host agent on a UNIX socket in a temporary
directory (``tests/unit/agentkit.py``), stopped after the test."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from testbed.vcenter import certs
from testbed.vcenter.config import VcenterConfig
from testbed.vcenter.service import VCenter
from tests.unit.agentkit import Lab, agent_lab


@pytest.fixture
def vc_config(tmp_path: Path) -> VcenterConfig:
    cfg = VcenterConfig(name="vc-t", fqdn="vc-t.unit.test", address="198.18.250.1", dir=str(tmp_path),
                        sso_domain="vsphere-t.local", lab="unit-no-lab")
    certs.make_self_signed(cfg.cert, cfg.key, cfg.fqdn, [cfg.fqdn], cfg.address)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(cfg.ssh_key)], check=True)
    cfg.domain_secret.write_bytes(b"s" * 32)
    return cfg


@pytest.fixture
async def vc(vc_config: VcenterConfig) -> AsyncIterator[VCenter]:
    v = VCenter(vc_config)
    yield v
    await v.close()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async with agent_lab(tmp_path) as agent:
        yield agent
