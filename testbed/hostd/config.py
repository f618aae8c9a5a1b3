"""A host agent's configuration, written by whoever provisions the host."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from testbed.names import check_vm_name, inside


class DatastoreConfig(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    path: str
    capacity_bytes: int


class HostConfig(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    dir: str                          # the agent's own directory (sockets, VMs, logs)
    datastores: tuple[DatastoreConfig, ...]
    port_groups: dict[str, str]       # port group name -> the host's bridge for it
    license: str = "enterprise-plus"
    qemu_binary: str = "qemu-system-x86_64"
    accel: str = "tcg"
    accel_reason: str = ""
    vmotion_address: str = ""
    mgmt_address: str = ""
    machine_types: tuple[str, ...] | None = None   # offer only these machine types (emulates an older host)
    # Where this host keeps the built-in guest image (vmlinuz, initrd.img): a host made from the host
    # image has its own copy; None: the paths in the VM's spec are used as they are (netns hosts).
    guest_image_dir: str | None = None
    # The only directories ``disk.import`` copies from and VMs boot kernels/initrds from (besides
    # guest_image_dir): the content libraries of the vCenters that manage this host. Nothing else of the host.
    import_dirs: tuple[str, ...] = ()

    @property
    def socket(self) -> Path:
        return Path(self.dir) / "hostd.sock"

    @property
    def pidfile(self) -> Path:
        return Path(self.dir) / "hostd.pid"

    @property
    def vms_dir(self) -> Path:
        return Path(self.dir) / "vms"

    def vm_dir(self, name: str) -> Path:
        """A VM's directory: its name by the rule, the path resolved and checked to stay in ``vms_dir``."""
        return inside(self.vms_dir, check_vm_name(name), f"VM directory on host {self.name}")

    @classmethod
    def load(cls, path: Path) -> HostConfig:
        return cls.model_validate_json(path.read_text())
