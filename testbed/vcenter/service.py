"""A vCenter's operations, one file per responsibility; ``VCenter`` puts them together.

``base`` (inventory, agent pool, VM claims), ``auth`` (SSO sessions), ``trust`` (peer vCenters), ``hosts``,
``vms``, ``tasks``, ``relocate`` (the source side of a move), ``admission`` (the destination side) and
``recovery`` (restart recovery, reconcile). The API (``api``) is a thin layer over this class.
"""

from __future__ import annotations

import asyncio

from testbed.vcenter.auth import Auth
from testbed.vcenter.recovery import Recovery


class VCenter(Recovery, Auth):
    """One vCenter: its SSO domain, inventory and hosts, and the moves it runs or admits."""

    async def close(self) -> None:
        for task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*self.running.values(), return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self._agents.values()), return_exceptions=True)
        self.inv.close()
