"""SSH to a lab host with paramiko, from inside a chosen network namespace.

``SshTarget`` says where and how (address, key, pinned host keys, the
namespace the connection starts from); ``SshSession.run`` returns a
``CompletedProcess`` and raises ``CommandError`` like asyncssh's ``run``.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import paramiko

from testbed.errors import CommandError, HostUnreachable
from testbed.net.cmd import socket_in_netns


@dataclass(frozen=True)
class SshTarget:
    host: str                    # the host's name, for messages
    address: str                 # management address
    key_path: Path               # private key
    known_hosts: Path            # pinned host keys
    from_netns: str | None = None
    port: int = 22
    user: str = "root"


class SshSession:
    """One SSH connection (blocking; wrap calls in ``asyncio.to_thread``)."""

    def __init__(self, target: SshTarget, timeout_s: float = 10.0) -> None:
        self.target = target
        t = target
        sock: socket.socket | None = None
        try:
            if t.from_netns:
                sock = socket_in_netns(t.from_netns)
                sock.settimeout(timeout_s)
                sock.connect((t.address, t.port))
            self.client = paramiko.SSHClient()
            self.client.load_host_keys(str(t.known_hosts))
            self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
            self.client.connect(t.address, port=t.port, username=t.user, key_filename=str(t.key_path),
                                sock=sock, timeout=timeout_s, banner_timeout=timeout_s, auth_timeout=timeout_s,
                                look_for_keys=False, allow_agent=False)
        except paramiko.AuthenticationException as err:
            raise HostUnreachable(
                f"host {t.host} ({t.address}) refused the lab's SSH key {t.key_path}: {err}",
                hint=f"check that the key is in root's authorized keys on {t.host}") from err
        except paramiko.SSHException as err:
            raise HostUnreachable(f"SSH to host {t.host} ({t.address}) failed: {err}",
                                  hint="is the host's sshd running and its host key the recorded one?") from err
        except OSError as err:
            if sock is not None:
                sock.close()
            raise HostUnreachable(
                f"cannot connect to host {t.host} at {t.address}:{t.port}"
                + (f" from namespace {t.from_netns}" if t.from_netns else "") + f": {err.strerror or err}",
                hint="is the lab up (`testbed lab status`) and the host's sshd running?") from err

    @classmethod
    def wrap(cls, client: paramiko.SSHClient, host: str) -> SshSession:
        """A session on a client someone else logged in (e.g. with a password)."""
        self = cls.__new__(cls)
        self.client = client
        self.target = SshTarget(host=host, address=host, key_path=Path("/dev/null"), known_hosts=Path("/dev/null"))
        return self

    def run(self, command: str, *, check: bool = True, timeout_s: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout_s)
        if input is not None:
            stdin.write(input)
        stdin.channel.shutdown_write()
        out = stdout.read().decode(errors="replace")
        err = stderr.read().decode(errors="replace")
        rc = stdout.channel.recv_exit_status()
        if check and rc != 0:
            raise CommandError([f"ssh {self.target.host}", command], rc, out, err)
        return subprocess.CompletedProcess([command], rc, out, err)

    def open_channel(self, command: str) -> paramiko.Channel:
        transport = self.client.get_transport()
        assert transport is not None
        chan = transport.open_session()
        chan.exec_command(command)
        return chan

    def close(self) -> None:
        self.client.close()


def connect_with_retry(target: SshTarget, wait_s: float = 10.0) -> SshSession:
    """Connect, retrying while the host's sshd is still starting (connection refused)."""
    import time
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return SshSession(target)
        except HostUnreachable as err:
            refused = isinstance(err.__cause__, ConnectionRefusedError)
            if not refused or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
