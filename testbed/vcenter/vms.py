"""VMs: create, power, delete, console; and the source copy an unverified move keeps until the user decides."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from typing import Any

from testbed.errors import Conflict, HostError, HostUnreachable, InputError, NotFound, TestbedError
from testbed.hosts.agent import remove_vm
from testbed.hosts.base import Host
from testbed.lab import topology as topo
from testbed.qemu.spec import VmSpec
from testbed.vcenter.base import VcBase, guest_running
from testbed.vcenter.library import ContentLibrary
from testbed.vcenter.vmspec import build_vm_spec, check_vm_request, realize_on_host

log = logging.getLogger("testbed.vcenter")


def _mac(seed: str) -> str:
    h = hashlib.sha256(seed.encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


class Vms(VcBase):
    """The VMs registered here, and the source copies kept for them; the content library they are made from."""

    @functools.cached_property
    def library(self) -> ContentLibrary:
        lib = ContentLibrary(self.cfg.library, self.cfg.name)
        if gone := lib.discard_partial_uploads():       # first use in this process: no upload of ours runs yet
            log.info("content library of %s: removed %d unfinished upload(s)", self.cfg.name, len(gone))
        return lib

    async def add_image(self, name: str, chunks: Any, kind: str | None = None, user: str = "") -> dict[str, Any]:
        item = await self.library.add_stream(name, chunks, kind=kind, user=user)
        self.inv.event("LibraryItemAddedEvent", f"content library item {name} added by {user or 'system'} "
                       f"({item['kind']}, {item['format']}, {item['size_bytes']} bytes, sha256 {item['sha256']})")
        return item

    def remove_image(self, name: str, user: str = "") -> None:
        users = self.library.in_use(name, self.inv.vms()) if name in self.library.catalog() else []
        if users:
            raise Conflict(f"content library item {name!r} of vCenter {self.cfg.name} is the kernel or initrd of "
                           f"VM {', '.join(users)}", hint="delete those VMs first")
        self.library.remove(name)
        self.inv.event("LibraryItemRemovedEvent", f"content library item {name} removed by {user or 'system'}")

    async def _own_guest(self, kernel: str | None, initrd: str | None,
                         image: str | None) -> tuple[str | None, str | None, str | None, str | None]:
        """The library items a VM names, as the paths to hand its host (checked: ``ContentLibrary.resolve``),
        and the image's format."""
        async def path(name: str | None, kind: str, what: str) -> tuple[str | None, str | None]:
            if name is None:
                return None, None
            p, item = await asyncio.to_thread(self.library.resolve, name, kind, what)
            return str(p), str(item["format"])
        if initrd is not None and kernel is None:
            raise InputError("an initrd needs a kernel: give --kernel too")
        k, _ = await path(kernel, "kernel", "kernel")
        i, _ = await path(initrd, "initrd", "initrd")
        im, fmt = await path(image, "disk", "image")
        return k, i, im, fmt

    def _next_ip(self) -> str:
        used = {v.get("ip") for v in self.inv.vms()}
        base = self.cfg.site_index * self.cfg.vm_ip_pool
        for i in range(self.cfg.vm_ip_pool):
            ip = topo.vm_address(base + i)
            if ip not in used:
                return ip
        raise Conflict(f"vCenter {self.cfg.name} has no VM address left in its pool of {self.cfg.vm_ip_pool}")

    async def create_vm(self, name: str, host: str, memory_bytes: int, disk_bytes: int | None, *,
                        datastore: str | None = None, network: str | None = None, workload: str = "idle",
                        vcpus: int = 1, start: bool = True, encrypted: bool = False,
                        kernel: str | None = None, initrd: str | None = None, append: str | None = None,
                        image: str | None = None, user: str = "") -> dict[str, Any]:
        """A VM of the built-in guest, or the user's own: ``kernel``/``initrd``/``append`` or a bootable
        ``image`` (copied to the datastore), each the name of an item of this vCenter's content library."""
        check_vm_request(name, memory_bytes)
        if kernel is not None and image is not None:
            raise InputError("give either --image or --kernel/--initrd, not both")
        kernel, initrd, image, image_format = await self._own_guest(kernel, initrd, image)
        h = self.inv.host(host)
        if h is None:
            self.managed(host)
            raise AssertionError
        dss = [d["name"] for d in h["facts"].get("datastores", [])]
        ds = datastore or (dss[0] if dss else "")
        if ds not in dss:
            raise NotFound(f"datastore {ds!r} is not on host {host}", hint="datastores there: " + ", ".join(dss))
        pgs = [p["name"] for p in h["facts"].get("port_groups", [])]
        pg = network or (pgs[0] if pgs else "")
        if pg not in pgs:
            raise NotFound(f"network {pg!r} is not on host {host}", hint="networks there: " + ", ".join(pgs))
        if self.inv.vm(name) is not None:
            raise Conflict(f"VM {name!r} already exists in vCenter {self.cfg.name}",
                           hint="choose another name or delete the old VM")
        with self.claim(name, "being created"):
            ip = self._next_ip()
            spec, wl, builtin = build_vm_spec(
                name, ip=ip, mac=_mac(f"{self.cfg.lab}/{self.cfg.name}/{name}"), memory_bytes=memory_bytes,
                disk_bytes=disk_bytes, workload=workload, datastore=ds, port_group=pg, vcpus=vcpus,
                encrypted=encrypted, kernel=kernel, initrd=initrd, append=append, image=image)
            row = {"name": name, "host": host, "state": "registered", "spec": spec.model_dump(mode="json"),
                   "ip": ip, "workload": wl.describe(), "builtin_guest": builtin, "created_s": time.time(),
                   "history": [{"host": host, "vcenter": self.cfg.name, "since_s": time.time()}]}
            self.inv.put_vm(row)
            await self.observe_heartbeats(name, ip)
            try:
                async with self.agent(host) as agent:
                    spec = await realize_on_host(agent, spec, image=image, image_format=image_format, start=start)
            except BaseException:
                await self._remove_from_host(host, spec)
                self.inv.delete_vm(name)
                await self.observe_heartbeats(name, None)
                raise
            row["spec"] = spec.model_dump(mode="json")
            self.inv.put_vm(row)
        self.inv.event("VmCreatedEvent", f"VM {name} created on {host} ({memory_bytes // 2**20} MiB, "
                       f"workload {wl.describe()}) by {user or 'system'}", vm=name, host=host)
        return await self.vm_info(name)

    async def _remove_from_host(self, host: str | Host, spec: VmSpec, *, strict: bool = False) -> list[str]:
        """Stop and remove ``spec``'s VM and disks from ``host``: what was done, in words. What could not be done
        is logged and listed too ("... failed: ..."), or, with ``strict``, raised as a ``HostError``."""
        where = host if isinstance(host, str) else host.name
        try:
            async with self.agent(host) as agent:
                done, failed = await remove_vm(agent, spec)
        except (HostUnreachable, TestbedError, TimeoutError) as err:
            done, failed = [], [f"host {where}: {str(err).splitlines()[0] or 'no answer in time'}"]
        if failed:
            log.warning("removing VM %s from %s: %s", spec.name, where, "; ".join(failed))
            if strict:
                raise HostError(f"VM {spec.name} could not be removed from host {where}: {'; '.join(failed)}",
                                hint="see the host's agent log; the inventory is unchanged, so try again")
        return done + [f"failed: {f}" for f in failed]

    async def vm_info(self, name: str, live: bool = True) -> dict[str, Any]:
        v = self.vm(name)
        spec = VmSpec.model_validate(v["spec"])
        power = "UNKNOWN"
        if live:
            try:
                async with self.agent(v["host"]) as agent:
                    st = await agent.call("vm.status", name=name)
                up = st.get("state") == "running"
                power = "POWERED_OFF" if not up else \
                    "POWERED_ON" if st.get("status", "running") == "running" else f"POWERED_ON ({st['status']})"
            except NotFound:
                power = "POWERED_OFF"
            except (HostUnreachable, TestbedError, TimeoutError):
                power = "UNKNOWN (host not responding)"
        return {"vm": name, "name": name, "host": v["host"], "power_state": power,
                "memory_size_MiB": spec.memory_bytes // 2**20, "cpu_count": spec.vcpus, "ip": v.get("ip"),
                "workload": v.get("workload"), "guest": "builtin" if v.get("builtin_guest") else "user",
                "disks": [{"datastore": d.datastore, "file": d.file, "capacity": d.size_bytes,
                           "encrypted": d.encrypted} for d in spec.disks],
                "nics": [{"network": n.port_group, "mac_address": n.mac} for n in spec.nics],
                "machine": spec.machine, "cpu_model": spec.cpu_model, "history": v.get("history", []),
                "busy": self.busy.get(name)}

    async def console_log(self, name: str) -> dict[str, Any]:
        v = self.vm(name)
        async with self.agent(v["host"]) as agent:
            text = (await agent.call("vm.console_log", name=name))["text"]
        return {"vm": name, "host": v["host"], "text": text}

    async def list_vms(self) -> list[dict[str, Any]]:
        vms = [v for v in self.inv.vms() if v["state"] == "registered"]
        live: dict[str, dict[str, Any]] = {}
        down: set[str] = set()

        async def ask(host: str) -> None:
            try:
                async with self.agent(host) as agent:
                    for d in await agent.call("vm.list"):
                        live[d["name"]] = d
            except (HostUnreachable, TestbedError, TimeoutError):
                down.add(host)
        await asyncio.gather(*(ask(h) for h in {v["host"] for v in vms}))
        out = []
        for v in vms:
            spec = VmSpec.model_validate(v["spec"])
            d = live.get(v["name"])
            if v["host"] in down:
                power = "UNKNOWN"
            elif d is None or d["state"] == "exited":
                power = "POWERED_OFF"
            else:
                power = "POWERED_ON" if d.get("status", "running") == "running" else f"POWERED_ON ({d['status']})"
            out.append({"vm": v["name"], "name": v["name"], "host": v["host"], "power_state": power,
                        "memory_size_MiB": spec.memory_bytes // 2**20, "ip": v.get("ip"),
                        "workload": v.get("workload"), "busy": self.busy.get(v["name"])})
        return out

    async def power(self, name: str, action: str, user: str = "") -> dict[str, Any]:
        v = self.vm(name)
        spec = VmSpec.model_validate(v["spec"])
        with self.claim(name, f"power {action}"):
            async with self.agent(v["host"]) as agent:
                if action == "start":
                    await agent.call("vm.start", spec=spec.model_dump())
                elif action == "stop":
                    await agent.call("vm.stop", name=name)
                else:
                    raise InputError(f"power action {action!r} is not one of: start, stop")
        self.inv.event("VmPoweredOnEvent" if action == "start" else "VmPoweredOffEvent",
                       f"VM {name} powered {'on' if action == 'start' else 'off'} on {v['host']} by {user or 'system'}",
                       vm=name, host=v["host"])
        return await self.vm_info(name)

    async def delete_vm(self, name: str, user: str = "") -> None:
        v = self.vm(name)
        with self.claim(name, "being deleted"):
            await self._remove_from_host(v["host"], VmSpec.model_validate(v["spec"]))
            self.inv.delete_vm(name)
            await self.observe_heartbeats(name, None)
        if self.inv.source_copy(name) is not None:   # the VM goes, and with it what its last move kept
            await self.discard_source(name, user)
        self.inv.event("VmRemovedEvent", f"VM {name} deleted from {v['host']} by {user or 'system'}",
                       vm=name, host=v["host"])

    def _keep_source_copy(self, t: dict[str, Any], name: str, host: str, spec: VmSpec, dest_host: str,
                          dest_name: str, why: str) -> None:
        """Record the paused source QEMU and disks a move left on ``host``, for ``discard_source``."""
        self.inv.put_source_copy({"vm": name, "host": host, "task": t["id"], "kept_s": time.time(),
                                  "spec": spec.model_dump(mode="json"), "moved_to": dest_host,
                                  "destination_vcenter": dest_name, "why": why})
        t.setdefault("notes", []).append(
            f"the source copy of {name} (paused QEMU and its disks) is kept on {host}: {why}. "
            f"`testbed vm discard-source {name}` removes it once you have decided")
        self.inv.put_task(t)
        self.inv.event("VmSourceCopyKeptEvent", f"source copy of VM {name} kept on {host} after its move to "
                       f"{dest_host} ({dest_name}): {why}", vm=name, host=host, task=t["id"])

    async def discard_source(self, name: str, user: str = "") -> dict[str, Any]:
        """Remove the source copy a move kept (the user decided): its QEMU, run directory and disks."""
        c = self.inv.source_copy(name)
        if c is None:
            raise NotFound(f"vCenter {self.cfg.name} keeps no source copy of VM {name!r}",
                           hint="only a move that was not verified, or failed after the switchover, keeps one; "
                                "`testbed vm source-copies` lists them")
        spec = VmSpec.model_validate(c["spec"])
        with self.claim(f"source copy of {name}", "being discarded"):
            async with self.agent(c["host"]) as agent:
                try:
                    st = await agent.call("vm.status", name=name)
                except NotFound:
                    st = {}
                row = self.inv.vm(name)
                if guest_running(st) and row is not None and row["host"] == c["host"]:
                    raise Conflict(f"VM {name} runs on {c['host']} again: that is the VM, not a kept copy",
                                   hint="nothing to discard; the inventory says it runs there")
                if guest_running(st):
                    raise Conflict(f"the source copy of VM {name} on {c['host']} is running, not paused: someone "
                                   "resumed it; discarding it would stop a running guest",
                                   hint=f"stop it first (on the host), or delete the VM {name} where it runs now")
                with contextlib.suppress(NotFound, TestbedError):
                    await agent.call("migration.finish", name=name)
            done = await self._remove_from_host(c["host"], spec, strict=True)
            self.inv.delete_source_copy(name)
        self.inv.event("VmSourceCopyDiscardedEvent", f"source copy of VM {name} on {c['host']} discarded by "
                       f"{user or 'system'}: {', '.join(done) or 'nothing was left there'}", vm=name, host=c["host"],
                       task=c["task"])
        return {"vm": name, "host": c["host"], "removed": done}
