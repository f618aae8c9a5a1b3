"""What a VM is, as the host agent needs to run it.

A ``VmSpec`` is frozen and validated at the edge (CLI, API); below it, no raw
dicts. Paths of disks are resolved by the host agent from datastore names.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# the name rule lives at the bottom of the house (the observer checks it too); re-exported for the layers above
from testbed.names import VM_NAME_RE as VM_NAME_RE
from testbed.names import VM_NAME_RULE as VM_NAME_RULE
from testbed.names import check_vm_name as check_vm_name
from testbed.names import vm_name_ok as vm_name_ok

MAC_RE = re.compile(r"^52:54:00(:[0-9a-f]{2}){3}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DiskSpec(_Frozen):
    datastore: str
    file: str                                  # file name inside the datastore
    size_bytes: int = Field(gt=0)
    format: Literal["qcow2", "raw"] = "qcow2"
    encrypted: bool = False                    # LUKS inside qcow2; the host keeps the key beside the disk


class NicSpec(_Frozen):
    port_group: str
    mac: str

    @model_validator(mode="after")
    def _mac(self) -> NicSpec:
        if not MAC_RE.fullmatch(self.mac):
            raise ValueError(f"MAC {self.mac!r} must look like 52:54:00:xx:xx:xx (lowercase)")
        return self


class BootSpec(_Frozen):
    """Either a kernel + initrd (direct boot) or the VM's first disk (a bootable image)."""

    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    from_disk: bool = False
    # The built-in guest image (kernel, initrd): a host with its own copy (HostConfig.guest_image_dir)
    # boots that one, whatever paths the spec carries.
    builtin: bool = False

    @model_validator(mode="after")
    def _one(self) -> BootSpec:
        if (self.kernel is None) == (not self.from_disk):
            raise ValueError("boot needs exactly one of: a kernel (+ initrd), or from_disk")
        return self


class VmSpec(_Frozen):
    name: str
    memory_bytes: int = Field(ge=32 * 1024**2)
    vcpus: int = Field(default=1, ge=1, le=16)
    boot: BootSpec
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    machine: str = "q35"
    cpu_model: str = "qemu64"
    agent: bool = True                         # runs the testbed guest agent

    def moved_to(self, datastore: str | None) -> VmSpec:
        """The same VM with every disk on ``datastore`` (a move's destination; None: where they are)."""
        if datastore is None:
            return self
        return self.model_copy(update={"disks": tuple(d.model_copy(update={"datastore": datastore})
                                                      for d in self.disks)})

    @model_validator(mode="after")
    def _boot_disk(self) -> VmSpec:
        if self.boot.from_disk and not self.disks:
            raise ValueError("booting from disk needs at least one disk")
        return self

    @model_validator(mode="after")
    def _name(self) -> VmSpec:
        if not vm_name_ok(self.name):
            raise ValueError(f"VM name {self.name!r} must be {VM_NAME_RULE}")
        return self
