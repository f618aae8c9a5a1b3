"""A lab's VMs as a user reaches them: each through the vCenter that holds it (create, power, relocate, delete,
discard a kept source copy), for the tests, the experiments and the benchmarks. One control plane: nothing here
starts, moves or removes a VM on a host by itself.

``relocate`` takes breakpoints: the move stops at the engine's named checkpoints, the caller's coroutine does
what the world would do there (kill a QEMU, cut the link, flip a byte), and the move goes on
(``POST /api/cis/tasks/{id}?action=continue``; administrators only; docs/vcenter.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from testbed.errors import Conflict, NotFound, TestbedError
from testbed.lab import builder
from testbed.lab import observer as obs
from testbed.migration.report import MigrationReport
from testbed.vcenter import deploy
from testbed.vcenter.client import VcClient

# What a breakpoint's caller gets: the task's ``held_at`` (checkpoint, since, the destination's incoming URI and
# NBD export); what it returns is awaited before the move goes on.
OnHold = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Move:
    """A relocate task at its end, and the engine's report if the engine ran (not after failed prechecks)."""
    task: dict[str, Any]
    report: MigrationReport | None

    @property
    def ok(self) -> bool:
        return bool(self.task["status"] == "SUCCEEDED")

    @property
    def error(self) -> str:
        return str((self.task.get("error") or {}).get("message") or "")


class LabVms:
    """The VMs of lab ``lab``, through its vCenters as their administrator. ``close()`` (or ``async with``) ends
    the sessions."""

    def __init__(self, lab: str) -> None:
        self.lab = lab
        self.state = builder.load_state(lab)
        self.topology = self.state.topology
        self.vcenters = [s.vcenter.name for s in self.topology.sites]
        self._clients: dict[str, VcClient] = {}

    async def __aenter__(self) -> LabVms:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for c in self._clients.values():
            with contextlib.suppress(TestbedError, OSError):
                c.logout()
            c.close()
        self._clients.clear()

    def client(self, vcenter: str) -> VcClient:
        if vcenter not in self._clients:
            self._clients[vcenter] = deploy.client(self.lab, vcenter)
        return self._clients[vcenter]

    def vcenter_of_host(self, host: str) -> str:
        return deploy.vcenter_of_host(self.topology, host)

    # --- where a VM is -------------------------------------------------------------------------------------
    async def find(self, name: str) -> tuple[str, dict[str, Any]]:
        """The vCenter that holds VM ``name``, and the VM as it shows it."""
        for vc in self.vcenters:
            with contextlib.suppress(NotFound):
                return vc, await self.client(vc).aget(f"/api/vcenter/vm/{name}")
        raise NotFound(f"VM {name!r} is in no vCenter of lab {self.lab} ({', '.join(self.vcenters)})",
                       hint=f"`testbed --lab {self.lab} vm list` shows the VMs")

    async def get(self, name: str) -> dict[str, Any]:
        return (await self.find(name))[1]

    async def names(self) -> set[str]:
        out: set[str] = set()
        for vc in self.vcenters:
            out |= {v["name"] for v in await self.client(vc).aget("/api/vcenter/vm")}
        return out

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def create(self, name: str, host: str, memory_bytes: int, disk_bytes: int | None, *,
                     workload: str = "idle", datastore: str | None = None, kernel: str | None = None,
                     initrd: str | None = None, append: str | None = None, image: str | None = None,
                     power_on: bool = True) -> dict[str, Any]:
        """A VM on ``host``, created by that host's vCenter. ``kernel``/``initrd``/``image`` name items of that
        vCenter's content library."""
        body: dict[str, Any] = {"name": name, "placement": {"host": host, "datastore": datastore},
                                "memory": memory_bytes, "disk": disk_bytes, "workload": workload,
                                "kernel": kernel, "initrd": initrd, "append": append, "image": image,
                                "power_on": power_on}
        body = {k: v for k, v in body.items() if v is not None or k == "disk"}
        body["placement"] = {k: v for k, v in body["placement"].items() if v is not None}
        vm: dict[str, Any] = await self.client(self.vcenter_of_host(host)).apost("/api/vcenter/vm", body)
        return vm

    async def power(self, name: str, action: str) -> dict[str, Any]:
        vc, _ = await self.find(name)
        vm: dict[str, Any] = await self.client(vc).apost(f"/api/vcenter/vm/{name}/power", params={"action": action})
        return vm

    async def delete(self, name: str) -> None:
        """Delete the VM where it is, and a source copy any vCenter of the lab still keeps of it."""
        vc, _ = await self.find(name)
        await self.client(vc).adelete(f"/api/vcenter/vm/{name}")
        for other in self.vcenters:
            with contextlib.suppress(NotFound):
                await self.client(other).adelete(f"/api/testbed/source-copies/{name}")

    async def discard_source(self, name: str) -> str:
        """Remove the source copy an unverified or failed move kept (the vCenter that ran the move keeps it);
        the host it was on."""
        for vc in self.vcenters:
            with contextlib.suppress(NotFound):
                d = await self.client(vc).adelete(f"/api/testbed/source-copies/{name}")
                return str(d["host"])
        raise NotFound(f"no vCenter of lab {self.lab} keeps a source copy of VM {name}")

    async def console_log(self, name: str) -> str:
        vc, _ = await self.find(name)
        return str((await self.client(vc).aget(f"/api/vcenter/vm/{name}/console"))["text"])

    async def upload(self, vcenter: str, item: str, path: Any) -> None:
        """Add a file to ``vcenter``'s content library as ``item``."""
        await asyncio.to_thread(self.client(vcenter).post, "/api/testbed/images", params={"name": item},
                                upload=path)

    # --- moves -----------------------------------------------------------------------------------------------
    def relocate_spec(self, from_vcenter: str, to_host: str, *, datastore: str | None = None,
                      options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A relocate's spec: within ``from_vcenter``, or across to the vCenter of ``to_host`` with the lab's
        credentials for it and its certificate's thumbprint pinned."""
        spec: dict[str, Any] = {"placement": {"host": to_host, **({"datastore": datastore} if datastore else {})},
                                "options": {k: v for k, v in (options or {}).items() if v is not None}}
        to_vc = self.vcenter_of_host(to_host)
        if to_vc != from_vcenter:
            spec["destination_vcenter"] = deploy.destination_vcenter(deploy.config_of(self.lab, to_vc))
        return spec

    async def relocate(self, name: str, to_host: str, *, datastore: str | None = None,
                       breakpoints: Mapping[str, OnHold] | None = None, timeout_s: float = 1800.0,
                       **options: Any) -> Move:
        """Move VM ``name`` to ``to_host`` as a user does and wait for the task's end. ``options``: the relocate's
        engine options (``converge``, ``bandwidth``, ``downtime_limit_ms``, ...). ``breakpoints``: checkpoint ->
        what to do while the move is held there."""
        vc, _ = await self.find(name)
        bps = dict(breakpoints or {})
        if bps:
            options = {**options, "breakpoints": list(bps)}
        c = self.client(vc)
        ref = await c.apost(f"/api/vcenter/vm/{name}",
                            {"spec": self.relocate_spec(vc, to_host, datastore=datastore, options=options)},
                            params={"action": "relocate"})
        tid = ref["task"]
        deadline = time.monotonic() + timeout_s
        done: set[str] = set()
        while True:
            t: dict[str, Any] = await c.aget(f"/api/cis/tasks/{tid}")
            if t["status"] != "RUNNING":
                report = MigrationReport.model_validate(t["result"]) if t.get("result") else None
                return Move(task=t, report=report)
            held = t.get("held_at")
            if held and held["checkpoint"] not in done:
                done.add(held["checkpoint"])
                try:
                    await bps[held["checkpoint"]](held)
                finally:
                    # a hold that ended by its time limit meanwhile is not held any more (409): nothing to release,
                    # and the caller's own error, if any, must not be hidden behind that
                    with contextlib.suppress(Conflict):
                        await c.apost(f"/api/cis/tasks/{tid}", params={"action": "continue"})
                continue
            if time.monotonic() > deadline:
                raise TestbedError(f"relocate task {tid} of VM {name} still running after {timeout_s:.0f} s",
                                   hint=f"`testbed --lab {self.lab} task watch {tid}` follows it")
            await asyncio.sleep(0.1 if bps else 0.5)

    # --- what the observer saw ---------------------------------------------------------------------------------
    async def wait_heartbeat(self, name: str, since_s: float, timeout_s: float = 30.0) -> float:
        """Seconds from ``since_s`` (monotonic) to the first heartbeat of ``name`` after it."""
        first = await obs.first_heartbeat(builder.LabPaths(self.lab).observer_socket, name, since_s, timeout_s)
        if first is None:
            raise TestbedError(f"no heartbeat from VM {name} within {timeout_s:.0f} s",
                               hint=f"see `testbed --lab {self.lab} vm console-log {name}`")
        return first

    async def heartbeat_stats(self, name: str, since_s: float | None = None,
                              gap_threshold_ms: float = 20) -> dict[str, Any]:
        return await obs.query(builder.LabPaths(self.lab).observer_socket,
                               {"op": "stats", "vm": name, "since_s": since_s, "gap_threshold_ms": gap_threshold_ms})
