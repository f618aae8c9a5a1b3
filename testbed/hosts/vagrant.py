"""The Vagrant lab's side of provisioning: each Vagrant host's identity, made by the nested kind's code.

The Vagrantfile runs ``python -m testbed.hosts.vagrant identity --lab LAB HOST`` for each host and
uploads the JSON, then runs ``testbed-provision apply`` on the host (``testbed.hosts.provision``),
exactly what a nested host applies at boot. The lab's keys and the hosts' root passwords and host
keys are kept in ``$TESTBED_HOME/labs/<LAB>/`` (made on first use), as for an embedded lab.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from testbed.errors import LabError, NotFound
from testbed.hosts.nested import NestedHost
from testbed.lab import builder
from testbed.lab import topology as topo
from testbed.lab.state import LabState


def topology(lab: str) -> topo.Topology:
    """The Vagrant lab: the default two sites, every host an L1 VM."""
    t = topo.default_topology(lab)
    return t.model_copy(update={"sites": tuple(
        s.model_copy(update={"hosts": tuple(h.model_copy(update={"kind": "nested"}) for h in s.hosts)})
        for s in t.sites)})


def run(vdir: Path, *args: str, hint: str, env: dict[str, str] | None = None, timeout_s: float = 120,
        stream: bool = False) -> str:
    """``vagrant ARGS`` in ``vdir``: its standard output, or a ``LabError`` with its tail and ``hint``.

    ``stream``: the user sees Vagrant's progress as it comes (stdout and stderr), and the last lines go into
    the error. A silent hang ends at ``timeout_s`` too: a timer stops Vagrant's process group."""
    if shutil.which("vagrant") is None:
        raise NotFound("vagrant is not installed", hint="`make setup-vagrant` installs vagrant and vagrant-libvirt")
    cmd = "vagrant " + " ".join(args)
    try:
        if stream:
            proc = subprocess.Popen(["vagrant", *args], cwd=vdir, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            assert proc.stdout is not None
            tail: list[str] = []
            fired = threading.Event()

            def stop() -> None:
                fired.set()
                os.killpg(proc.pid, signal.SIGTERM)
            timer = threading.Timer(timeout_s, stop)
            timer.start()
            try:
                for line in proc.stdout:
                    print("    " + line.rstrip(), flush=True)
                    tail = (tail + [line.rstrip()])[-15:]
                rc = proc.wait()
            finally:
                timer.cancel()
            if fired.is_set():
                raise subprocess.TimeoutExpired(cmd, timeout_s)
            out, said = "\n".join(tail), "\n".join(tail)
        else:
            p = subprocess.run(["vagrant", *args], cwd=vdir, env=env, capture_output=True, text=True,
                               timeout=timeout_s)
            rc, out, said = p.returncode, p.stdout, (p.stderr or p.stdout)
    except subprocess.TimeoutExpired as err:
        raise LabError(f"`{cmd}` in {vdir} did not finish within {timeout_s:.0f} s", hint=hint) from err
    if rc != 0:
        raise LabError(f"`{cmd}` in {vdir} failed (exit {rc}): {said.strip()[-800:]}", hint=hint)
    return out


def identity_json(lab: str, host: str) -> str:
    t = topology(lab)
    _, _, _, spec = t.host(host)
    paths = builder.LabPaths(lab)
    paths.dir.mkdir(parents=True, exist_ok=True)
    if not paths.key.exists():
        builder._keygen(paths.key, f"testbed-lab-{lab}")
    hd = paths.host_dir(host)
    hd.mkdir(parents=True, exist_ok=True)
    if not (hd / "ssh_host_ed25519_key").exists():
        builder._keygen(hd / "ssh_host_ed25519_key", f"root@{host}")
    if not (hd / "shadow").exists():
        builder._root_password(paths, spec)
    return NestedHost(LabState(name=lab, topology=t), host).identity().model_dump_json()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.hosts.vagrant")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("identity", help="print HOST's identity (JSON) for `testbed-provision apply`")
    i.add_argument("--lab", default="vg")
    i.add_argument("host")
    sub.add_parser("hosts", help="print the Vagrant lab's hosts: name site-index host-index MACs")
    args = ap.parse_args(argv)
    if args.cmd == "identity":
        print(identity_json(args.lab, args.host))
        return 0
    t = topology("vg")
    for si, _, hi, h in t.hosts():
        nh = NestedHost(LabState(name="vg", topology=t), h.name)
        print(h.name, si, hi, " ".join(f"{role}={mac}" for role, mac, _, _ in nh.macs()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
