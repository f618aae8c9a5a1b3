"""Which accelerator really works here: KVM only if a guest actually boots under it.

``/dev/kvm`` can exist and still not run stock guests (on this project's machine the
kvm_pvm module answers and then the guest hangs), so the probe boots the guest kernel under KVM and waits for it to
print. The answer is cached per (kernel release, QEMU version).
"""

from __future__ import annotations

import json
import os
import platform
import select
import subprocess
import time
from pathlib import Path

PROBE_TIMEOUT_S = 4.0


def _qemu_version(qemu: str) -> str:
    try:
        return subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout.split("\n")[0]
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def probe(kernel: Path | None, cache: Path, qemu: str = "qemu-system-x86_64") -> tuple[str, str]:
    """("kvm" or "tcg", why)."""
    if os.environ.get("TESTBED_ACCEL") in ("tcg", "kvm"):
        return os.environ["TESTBED_ACCEL"], "set by TESTBED_ACCEL"
    if not os.path.exists("/dev/kvm"):
        return "tcg", "no /dev/kvm"
    key = f"{platform.release()} | {_qemu_version(qemu)}"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["accel"], cached["reason"] + " (cached)"
    except (OSError, ValueError, KeyError):
        pass
    if kernel is None or not kernel.exists():
        return "tcg", "no guest kernel to probe KVM with (build the guest image)"
    accel, reason = _boot_probe(kernel, qemu)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "accel": accel, "reason": reason}))
    return accel, reason


def _boot_probe(kernel: Path, qemu: str) -> tuple[str, str]:
    argv = [qemu, "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "128", "-nodefaults",
            "-display", "none", "-no-reboot", "-kernel", str(kernel), "-serial", "stdio",
            "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 0.1)
            if r:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
                if b"Linux version" in seen:
                    return "kvm", "a guest kernel booted under KVM"
    finally:
        proc.kill()
        proc.wait()
    tail = seen.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return "tcg", (f"/dev/kvm exists but a guest kernel did not boot under KVM within {PROBE_TIMEOUT_S:.0f} s "
                   f"({tail[0][:120]})")
