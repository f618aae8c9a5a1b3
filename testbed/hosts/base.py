"""One interface for every host kind (netns, nested, vagrant).

A host is reached over SSH; its agent (``testbed-hostd``) is found the same way
on every kind: the command ``$TESTBED_HOSTD`` (default ``testbed-hostd``) with
the host's configuration at ``$TESTBED_HOSTD_CONFIG`` (default
/etc/testbed/hostd.json), both set by the host's provisioning. So adding a
host to a vCenter reads the same for every kind (``testbed.vcenter.hostconn``).
"""

from __future__ import annotations

import abc
from typing import ClassVar

from testbed.errors import HostError
from testbed.hosts.agent import AgentClient
from testbed.hosts.ssh import SshSession, SshTarget

HOSTD = '"${TESTBED_HOSTD:-testbed-hostd}"'
AGENT_CONNECT = f"{HOSTD} connect"


class Host(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, name: str, site: str) -> None:
        self.name = name
        self.site = site

    @abc.abstractmethod
    def ssh_target(self) -> SshTarget: ...

    async def agent(self) -> AgentClient:
        return await AgentClient.connect(self.ssh_target(), AGENT_CONNECT)


def start_agent(session: SshSession, first: str = "") -> int:
    """Start the agent of the host ``session`` is logged in to (or find it running); returns its PID.

    ``first``: a shell command to run before, in the same round trip. Blocking: call it in a thread.
    """
    out = session.run(f"{first + ' && ' if first else ''}{HOSTD} serve --daemon", timeout_s=30, check=False)
    try:
        if out.returncode != 0:
            raise ValueError
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        host = session.target.host
        raise HostError(f"the host agent on {host} did not start (exit {out.returncode}): "
                        f"{(out.stderr or out.stdout).strip()[-400:]}",
                        hint=f"see hostd.log in the agent's directory on {host}; is the host provisioned "
                             "(testbed-hostd installed, $TESTBED_HOSTD_CONFIG written)?") from None
