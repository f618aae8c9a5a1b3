"""A new VM's spec and its making on a host: what a vCenter does between "create VM" and the QEMU process
(``testbed.vcenter.vms``), and what ``testbed bench`` does for the VM it hands to libvirt instead.

``build_vm_spec`` turns a request into a ``VmSpec`` (the built-in guest or the user's own kernel or image);
``realize_on_host`` fixes its machine type to the host's and creates (or imports) its disks there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.errors import InputError, NotFound
from testbed.guest.workload import Workload, agent_cmdline, parse_workload
from testbed.hosts.agent import AgentClient
from testbed.lab import topology as topo
from testbed.paths import GUEST_IMAGE_DIR
from testbed.qemu.spec import BootSpec, DiskSpec, NicSpec, VmSpec, check_vm_name


def resolve_machine(facts: dict[str, Any], machine: str) -> str:
    """'q35' -> the host's concrete versioned type (pc-q35-10.0): migrations need it fixed."""
    return str(facts.get("machine_aliases", {}).get(machine, machine))


def check_vm_request(name: str, memory_bytes: int) -> None:
    check_vm_name(name)
    if memory_bytes < 64 * 1024**2:
        raise InputError(f"VM {name}: {memory_bytes // 1024**2} MiB of memory is too little",
                         hint="give at least 64M (the built-in guest wants 256M or more)")


def build_vm_spec(name: str, *, ip: str, mac: str, memory_bytes: int, disk_bytes: int | None, workload: str,
                  datastore: str, port_group: str, kernel: str | None = None, initrd: str | None = None,
                  append: str | None = None, image: str | None = None,
                  vcpus: int = 1, encrypted: bool = False) -> tuple[VmSpec, Workload, bool]:
    """The spec of a new VM: the built-in guest (kernel, initrd, agent command line) or the user's own.

    Returns the spec, its workload and whether it runs the built-in guest.
    """
    wl: Workload = parse_workload(workload)
    builtin = kernel is None and image is None
    if image is not None and kernel is not None:
        raise InputError("give either --image or --kernel/--initrd, not both")
    if not builtin and wl != Workload():
        raise InputError(f"VM {name}: a workload needs the built-in guest (its agent runs it)",
                         hint="drop --workload, or drop --kernel/--image")
    disks: list[DiskSpec] = []
    if disk_bytes:
        disks.append(DiskSpec(datastore=datastore, file=f"{name}-disk0.qcow2", size_bytes=disk_bytes,
                              encrypted=encrypted))
    elif encrypted:
        raise InputError(f"VM {name}: an encrypted VM needs a disk (--disk)")
    if builtin:
        k, i = GUEST_IMAGE_DIR / "vmlinuz", GUEST_IMAGE_DIR / "initrd.img"
        if not k.exists() or not i.exists():
            raise NotFound(f"the built-in guest image is not built ({GUEST_IMAGE_DIR})", hint="run `make image`")
        boot = BootSpec(kernel=str(k), initrd=str(i), builtin=True,
                        append=agent_cmdline(name, ip, f"{topo.OBSERVER_IP}:{topo.OBSERVER_PORT}",
                                             wl, memory_bytes, append or ""))
    elif kernel is not None:
        boot = BootSpec(kernel=str(Path(kernel).resolve()),
                        initrd=str(Path(initrd).resolve()) if initrd else None, append=append or "")
    else:
        if disk_bytes:
            raise InputError("with --image the image is the VM's disk; drop --disk")
        disks.append(DiskSpec(datastore=datastore, file=f"{name}-disk0.qcow2", size_bytes=1))
        boot = BootSpec(from_disk=True)
    spec = VmSpec(name=name, memory_bytes=memory_bytes, vcpus=vcpus, boot=boot, disks=tuple(disks),
                  nics=(NicSpec(port_group=port_group, mac=mac),))
    return spec, wl, builtin


async def realize_on_host(agent: AgentClient, spec: VmSpec, *, image: str | None = None,
                          image_format: str | None = None, start: bool = True) -> VmSpec:
    """Make ``spec`` real on the agent's host: its machine type fixed, its disks created (or imported from
    ``image``, a file in one of the host's import directories, of ``image_format``: None, the agent reads it).

    Returns the spec as it now is; starts the VM if asked. The caller undoes on failure.
    """
    facts = await agent.call("host.facts")
    disks = list(spec.disks)
    if image is not None:
        info = await agent.call("disk.import", datastore=disks[0].datastore, file=disks[0].file,
                                source=str(Path(image).resolve()), format=image_format)
        disks[0] = disks[0].model_copy(update={"size_bytes": info["size_bytes"]})
    else:
        for d in disks:
            await agent.call("disk.create", datastore=d.datastore, file=d.file, size_bytes=d.size_bytes,
                             encrypted=d.encrypted)
    spec = spec.model_copy(update={"machine": resolve_machine(facts, spec.machine), "disks": tuple(disks)})
    if start:
        await agent.call("vm.start", spec=spec.model_dump())
    return spec
