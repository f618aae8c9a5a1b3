"""Run local commands, optionally inside a network namespace.

``run`` returns ``subprocess.CompletedProcess`` and raises ``CommandError``
(command, exit status, output) on failure, like asyncssh's ``run``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import threading

from testbed.errors import CommandError

NETNS_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()


def run(argv: list[str], *, netns: str | None = None, input: str | None = None,
        check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (inside ``netns`` if given); raise CommandError on failure."""
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError as err:
        raise CommandError(argv, 127, "", f"{argv[0]}: not installed") from err
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def ip_batch(commands: list[str], *, netns: str | None = None) -> None:
    """Run many ``ip`` commands in one process (``ip -batch``): one fork, not dozens."""
    if not commands:
        return
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    run(argv, input="\n".join(commands) + "\n")


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def netns_pids(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is ``name`` (like ``ip netns pids``)."""
    try:
        target = os.stat(os.path.join(NETNS_DIR, name))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return pids


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def socket_in_netns(name: str, family: int = socket.AF_INET,
                    type: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket created inside network namespace ``name``.

    A socket belongs to the namespace it was created in, whatever thread uses
    it later; only the creating thread switches namespace, and switches back.
    """
    with _setns_lock:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            try:
                target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
            except FileNotFoundError as err:
                raise OSError(errno.ENOENT, f"network namespace {name} does not exist") from err
            try:
                _setns(target)
                try:
                    return socket.socket(family, type)
                finally:
                    _setns(own)
            finally:
                os.close(target)
        finally:
            os.close(own)
