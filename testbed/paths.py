"""Where the testbed keeps its files.

``$TESTBED_HOME`` (default /var/lib/testbed) holds one directory per lab,
``labs/<lab>/``, which the lab owns entirely: ``lab down`` removes it.
``$TESTBED_LAB`` (default ``tb``) names the lab the CLI works on.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GUEST_IMAGE_DIR = Path(os.environ.get("TESTBED_GUEST_IMAGE", REPO_ROOT / "images" / "guest" / "build"))


def testbed_home() -> Path:
    return Path(os.environ.get("TESTBED_HOME", "/var/lib/testbed"))


def default_lab_name() -> str:
    return os.environ.get("TESTBED_LAB", "tb")


def lab_dir(lab: str) -> Path:
    return testbed_home() / "labs" / lab


def library_items_dir(lab: str, vcenter: str) -> Path:
    """Where vCenter ``vcenter`` of ``lab`` keeps its content library's files (``VcenterConfig.library_items``):
    the hosts of an embedded lab import from and boot from these, and from nothing else of the machine."""
    return lab_dir(lab) / "vcenters" / vcenter / "library" / "items"
