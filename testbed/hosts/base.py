"""One interface for every host kind (netns here; nested and vagrant later).

A host is reached over SSH; its agent is started over that SSH connection
with a configuration pushed the same way, so provisioning reads the same for
every kind.
"""

from __future__ import annotations

import abc
import asyncio
from typing import ClassVar

from testbed.errors import HostError
from testbed.hostd.config import HostConfig
from testbed.hosts.agent import AgentClient
from testbed.hosts.ssh import SshTarget, connect_with_retry


class Host(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, name: str, site: str) -> None:
        self.name = name
        self.site = site

    @abc.abstractmethod
    def ssh_target(self) -> SshTarget: ...

    @abc.abstractmethod
    def agent_config(self) -> HostConfig: ...

    @property
    @abc.abstractmethod
    def python(self) -> str:
        """The Python interpreter on the host that has the testbed package."""

    @property
    def agent_command(self) -> str:
        return f"{self.python} -m testbed.hostd connect --socket {self.agent_config().socket}"

    async def agent(self) -> AgentClient:
        return await AgentClient.connect(self.ssh_target(), self.agent_command)

    async def start_agent(self) -> int:
        """Push the agent's configuration and start it over SSH; returns its PID."""
        cfg = self.agent_config()
        cfg_path = f"{cfg.dir}/hostd.json"

        def go() -> int:
            s = connect_with_retry(self.ssh_target())
            try:
                out = s.run(f"mkdir -p {cfg.dir} && cat > {cfg_path} && "
                            f"{self.python} -m testbed.hostd serve --config {cfg_path} --daemon",
                            input=cfg.model_dump_json(indent=1), timeout_s=30).stdout.strip()
            finally:
                s.close()
            try:
                return int(out.splitlines()[-1])
            except (ValueError, IndexError):
                raise HostError(f"the host agent on {self.name} did not report its PID (got {out!r})",
                                hint=f"see {cfg.dir}/hostd.log on {self.name}") from None

        return await asyncio.to_thread(go)
