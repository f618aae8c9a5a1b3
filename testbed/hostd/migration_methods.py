"""The host agent's ``migration.*`` methods: each hands the work to the VM's ``SourceRole`` or ``DestinationRole``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.errors import Conflict, InputError, NotFound
from testbed.hostd.agent_base import Connection, method
from testbed.hostd.datastore import format_of
from testbed.hostd.destination import DestinationRole
from testbed.hostd.source import SourceRole, reachable
from testbed.hostd.vm_methods import VmMethods
from testbed.qemu.spec import VmSpec


class MigrationMethods(VmMethods):
    """Live migration, from or to this host."""

    @method("migration.prepare_incoming")
    async def m_migration_prepare_incoming(self, conn: Connection, spec: dict[str, Any],
                                           streams: int = 1, postcopy: bool = False) -> dict[str, Any]:
        """Destination: start QEMU paused for incoming, NBD export of its disks, migrate-incoming."""
        if not self.cfg.vmotion_address:
            raise InputError(f"host {self.cfg.name} has no vMotion address configured")
        name = VmSpec.model_validate(spec).name
        await self.m_vm_start(conn, spec, incoming=True)
        role = DestinationRole(self.vms[name], self.cfg.vmotion_address)
        self.destinations[name] = role
        try:
            return await role.prepare(streams, postcopy)
        except BaseException:
            await self.vms[name].kill()
            raise

    @method("migration.abort_incoming")
    async def m_migration_abort_incoming(self, conn: Connection, name: str) -> dict[str, Any]:
        """Destination rollback: stop the incoming QEMU unless its guest already runs here (then ``Conflict``).

        One call, so that no resume can come between the check and the kill: the role stops reacting to the
        source's completion first, and the guest's run state is read after that."""
        role = self.destinations.get(name)
        if role is not None:
            await role.abort()
        vm = self._vm(name)
        if vm.alive:
            status = (await vm.execute("query-status"))["status"]
            if status == "running":
                raise Conflict(f"VM {name} already runs on host {self.cfg.name}: the move completed here",
                               hint="commit the move instead of aborting it")
            await vm.kill()
            return {"undone": [f"incoming QEMU of {name} on {self.cfg.name} stopped (was {status})"]}
        return {"undone": []}

    @method("migration.mirror")
    async def m_migration_mirror(self, conn: Connection, name: str, nbd_host: str, nbd_port: int,
                                 mode: str = "write-blocking", granularity: int | None = None) -> list[str]:
        """Source: mirror every disk to the destination's NBD export (write-blocking or background-throttled)."""
        vm = self._vm(name)
        if name in self.sources:
            raise Conflict(f"VM {name} on host {self.cfg.name} is already migrating")
        role = self.sources[name] = SourceRole(vm, Path(self.cfg.dir))
        return await role.mirror(nbd_host, nbd_port, mode, granularity)

    @method("migration.start")
    async def m_migration_start(self, conn: Connection, name: str, uri: str, streams: int = 1,
                                auto_converge: bool = True, max_bandwidth_bps: int | None = None,
                                downtime_limit_ms: int = 300, hold_switchover: bool = False,
                                max_throttle_pct: int = 90, postcopy: bool = False,
                                sdps: dict[str, Any] | None = None) -> None:
        role = self.sources.get(name)
        if role is None:   # a VM without disks skips the mirror
            role = self.sources[name] = SourceRole(self._vm(name), Path(self.cfg.dir))
        await role.migrate(uri, streams, auto_converge, max_bandwidth_bps, downtime_limit_ms, hold_switchover,
                           max_throttle_pct, postcopy=postcopy, sdps=sdps)

    @method("migration.tune")
    async def m_migration_tune(self, conn: Connection, name: str, downtime_limit_ms: int | None = None) -> None:
        await self._source(name).tune(downtime_limit_ms)

    @method("migration.start_postcopy")
    async def m_migration_start_postcopy(self, conn: Connection, name: str) -> None:
        await self._source(name).start_postcopy()

    @method("migration.pause")
    async def m_migration_pause(self, conn: Connection, name: str) -> None:
        """Post-copy on a broken channel: ``migrate-pause`` on whichever role this host has."""
        if name in self.sources:
            await self.sources[name].pause()
        elif name in self.destinations:
            await self.destinations[name].pause()
        else:
            raise NotFound(f"VM {name} is not migrating on host {self.cfg.name}")

    @method("migration.recover")
    async def m_migration_recover(self, conn: Connection, name: str) -> dict[str, Any]:
        """Destination: listen for the source again after a post-copy failure."""
        role = self.destinations.get(name)
        if role is None:
            raise NotFound(f"VM {name} is not migrating to host {self.cfg.name}")
        return {"uri": await role.recover()}

    @method("migration.resume")
    async def m_migration_resume(self, conn: Connection, name: str, uri: str) -> dict[str, Any]:
        """Source: reconnect a paused post-copy to ``uri``, if the destination answers at all."""
        host = uri.split(":")[1]
        if not await reachable(host):
            return {"resumed": False, "why": f"{host} does not answer from host {self.cfg.name}"}
        await self._source(name).resume(uri)
        return {"resumed": True}

    @method("migration.release_switchover")
    async def m_migration_release_switchover(self, conn: Connection, name: str) -> None:
        self._source(name).release_switchover()

    @method("migration.cancel")
    async def m_migration_cancel(self, conn: Connection, name: str, resume_completed: bool = False) -> dict[str, Any]:
        """Source rollback: cancel migration and mirrors, resume the guest here (after a completed migration only
        with ``resume_completed``: the caller has stopped the destination)."""
        role = self.sources.pop(name, None)
        if role is None:
            vm = self._vm(name)
            if vm.alive:
                status = (await vm.execute("query-status"))["status"]
                if status == "postmigrate" and not resume_completed:
                    return {"undone": ["the migration had completed: the guest stays paused here (postmigrate) "
                                       "until the destination is known to be stopped"], "completed": True}
                if status != "running":
                    await vm.execute("cont")
                    return {"undone": [f"guest resumed on the source (was {status})"], "completed": False}
            return {"undone": [], "completed": False}
        return await role.cancel(resume_completed)

    @method("migration.status")
    async def m_migration_status(self, conn: Connection, name: str) -> dict[str, Any]:
        """QEMU's migration status of VM ``name`` here (``query-migrate``'s ``status``), and nothing else of it."""
        info = await self._vm(name).execute("query-migrate")
        return {"status": info.get("status") if isinstance(info, dict) else None}

    @method("migration.finish")
    async def m_migration_finish(self, conn: Connection, name: str) -> None:
        """Forget the migration roles of ``name`` on this host (after commit or rollback)."""
        role = self.sources.pop(name, None)
        if role is not None:
            role.detach()
        dest = self.destinations.pop(name, None)
        if dest is not None:
            dest.detach()

    @method("disk.digest")
    async def m_disk_digest(self, conn: Connection, datastore: str, file: str) -> dict[str, Any]:
        """Per-MiB SHA-256 of a disk's contents, and the guest agent's block ring if present."""
        from testbed.hostd.diskcheck import digest
        path = self.datastores.path(datastore, file)
        return await digest(path, self.cfg.name, format_of(path))
