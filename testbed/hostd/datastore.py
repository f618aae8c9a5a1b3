"""The host's datastores: directories of disk images, managed with qemu-img.

Space is accounted thick, the way vCenter's provisioning checks do: a disk
counts with its virtual size, and the datastore's free space is its capacity
minus those sizes (never more than the filesystem really has free).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path
from typing import Any

from testbed.errors import Conflict, Forbidden, InputError, NotFound, TestbedError
from testbed.hostd.config import DatastoreConfig, HostConfig
from testbed.names import check_datastore_name, check_disk_file, inside
from testbed.qemu import images
from testbed.units import format_bytes


async def qemu_img(*args: str, host: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise TestbedError(f"qemu-img {' '.join(args)} failed on host {host}: "
                           f"{err.decode(errors='replace').strip()}")
    return out.decode()


class Datastores:
    def __init__(self, cfg: HostConfig) -> None:
        self.cfg = cfg
        self._by_name = {d.name: d for d in cfg.datastores}
        self._lock = asyncio.Lock()
        for d in cfg.datastores:
            Path(d.path).mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> DatastoreConfig:
        try:
            return self._by_name[name]
        except KeyError:
            raise NotFound(f"datastore {name!r} does not exist on host {self.cfg.name}",
                           hint="datastores here: " + ", ".join(self._by_name)) from None

    def path(self, datastore: str, file: str) -> Path:
        """The disk's path: both names by their rule, the path resolved and checked to stay in the datastore."""
        check_disk_file(file)
        return inside(Path(self.get(check_datastore_name(datastore)).path), file, f"disk file on datastore "
                      f"{datastore} of host {self.cfg.name}")

    async def _provisioned(self, ds: DatastoreConfig) -> int:
        total = 0
        for entry in sorted(Path(ds.path).iterdir()):
            if entry.is_file() and not entry.name.startswith("."):
                total += await self._virtual_size(entry)
        return total

    async def _virtual_size(self, path: Path) -> int:
        info = json.loads(await qemu_img(*images.info_args(path, format_of(path)), host=self.cfg.name))
        return int(info["virtual-size"])

    async def describe(self, ds: DatastoreConfig) -> dict[str, Any]:
        provisioned = await self._provisioned(ds)
        st = os.statvfs(ds.path)
        fs_free = st.f_bavail * st.f_frsize
        free = max(0, min(ds.capacity_bytes - provisioned, fs_free))
        return {"name": ds.name, "path": ds.path, "capacity_bytes": ds.capacity_bytes,
                "provisioned_bytes": provisioned, "free_bytes": free,
                "filesystem_free_bytes": fs_free,
                "disks": sorted(p.name for p in Path(ds.path).iterdir() if p.is_file() and not p.name.startswith("."))}

    async def list(self) -> list[dict[str, Any]]:
        return [await self.describe(d) for d in self.cfg.datastores]

    async def _reserve(self, datastore: str, file: str, size_bytes: int) -> Path:
        path = self.path(datastore, file)
        if path.exists():
            raise Conflict(f"disk {file!r} already exists on datastore {datastore} of host {self.cfg.name}",
                           hint="choose another name or delete the old disk first")
        ds = self.get(datastore)
        free = (await self.describe(ds))["free_bytes"]
        if size_bytes > free:
            raise InputError(
                f"datastore {datastore} on host {self.cfg.name} has {format_bytes(free)} free; "
                f"disk {file} needs {format_bytes(size_bytes)}",
                hint="use a smaller disk, another datastore, or free space by deleting VMs")
        return path

    async def create(self, datastore: str, file: str, size_bytes: int, fmt: str = "qcow2",
                     encrypted: bool = False) -> dict[str, Any]:
        """A new disk; ``encrypted``: LUKS inside qcow2, its key beside it (``key_path``, 0600)."""
        if size_bytes <= 0 or size_bytes % 512:
            raise InputError(f"disk size {size_bytes} must be a positive multiple of 512 bytes")
        if encrypted and fmt != "qcow2":
            raise InputError("only qcow2 disks can be encrypted here")
        async with self._lock:
            path = await self._reserve(datastore, file, size_bytes)
            opts: list[str] = []
            if encrypted:
                key = key_path(path)
                key.touch(mode=0o600)
                key.write_text(secrets.token_hex(32))
                opts = ["--object", f"secret,id=sec0,file={key},format=raw",
                        "-o", "encrypt.format=luks,encrypt.key-secret=sec0"]
            try:
                await qemu_img("create", "-q", "-f", fmt, *opts, str(path), str(size_bytes), host=self.cfg.name)
                set_format(path, fmt)
            except BaseException:
                key_path(path).unlink(missing_ok=True)
                format_path(path).unlink(missing_ok=True)
                raise
        return await self.info(datastore, file)

    def allowed_source(self, source: str, what: str) -> Path:
        """``source`` resolved (symbolic links followed) if it is a file inside one of the host's import
        directories (``HostConfig.import_dirs``), else ``Forbidden``: a VM never reads another file of the host."""
        try:
            src = Path(source).resolve(strict=True)
        except (OSError, RuntimeError):
            raise NotFound(f"{what} {source} does not exist on host {self.cfg.name}",
                           hint="VM images come from a vCenter's content library: `testbed image list`") from None
        for d in self.cfg.import_dirs:
            root = Path(d).resolve()
            if src.is_relative_to(root) and src != root:
                if not src.is_file():
                    raise InputError(f"{what} {source} on host {self.cfg.name} is not a regular file")
                return src
        raise Forbidden(f"{what} {source} is outside the directories host {self.cfg.name} imports from "
                        f"({', '.join(self.cfg.import_dirs) or 'none configured'})",
                        hint="VM images come from a vCenter's content library: `testbed image add FILE`")

    async def import_image(self, datastore: str, file: str, source: str, fmt: str | None = None) -> dict[str, Any]:
        """Copy a bootable image (from an import directory: a content library) into the datastore as a qcow2
        disk. Its format is ``fmt`` or read from its header, never guessed by qemu-img (``-f`` always), and an
        image with a backing or data file (which would make QEMU read another host file) is refused."""
        src = self.allowed_source(source, "image")
        probed = images.probe_format(src)
        if fmt is not None and fmt != probed:
            raise InputError(f"image {source} on host {self.cfg.name} is {probed}, not {fmt}")
        info = json.loads(await qemu_img(*images.info_args(src, probed), host=self.cfg.name))
        problem = images.image_problem(info, probed)
        if problem:
            raise InputError(f"image {source} refused on host {self.cfg.name}: {problem}", hint=images.REFUSED_HINT)
        size = int(info["virtual-size"])
        async with self._lock:
            path = await self._reserve(datastore, file, size)
            try:
                await qemu_img("convert", "-q", "-f", probed, "-O", "qcow2", str(src), str(path),
                               host=self.cfg.name)
                set_format(path, "qcow2")
            except BaseException:
                path.unlink(missing_ok=True)
                format_path(path).unlink(missing_ok=True)
                raise
        return await self.info(datastore, file)

    async def info(self, datastore: str, file: str) -> dict[str, Any]:
        path = self.path(datastore, file)
        if not path.exists():
            raise NotFound(f"disk {file!r} does not exist on datastore {datastore} of host {self.cfg.name}")
        info = json.loads(await qemu_img(*images.info_args(path, format_of(path)), host=self.cfg.name))
        return {"datastore": datastore, "file": file, "path": str(path),
                "size_bytes": int(info["virtual-size"]), "allocated_bytes": int(info.get("actual-size", 0)),
                "format": info["format"], "encrypted": bool(info.get("encrypted", False))}

    async def delete(self, datastore: str, file: str) -> None:
        path = self.path(datastore, file)
        key_path(path).unlink(missing_ok=True)
        format_path(path).unlink(missing_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFound(f"disk {file!r} does not exist on datastore {datastore} of host "
                           f"{self.cfg.name}") from None


def key_path(disk: Path) -> Path:
    """Where an encrypted disk's key lives: a hidden file beside it (the lab's key provider)."""
    return disk.with_name(f".{disk.name}.key")


def format_path(disk: Path) -> Path:
    """Where a disk's format is kept (a hidden file beside it): qemu-img is told it (``-f``), never lets a raw
    disk, whose first bytes the guest writes, pass for a qcow2 with a backing file."""
    return disk.with_name(f".{disk.name}.format")


def set_format(disk: Path, fmt: str) -> None:
    format_path(disk).write_text(fmt + "\n")


def format_of(disk: Path) -> str:
    """The disk's format as recorded when it was made (qcow2 where nothing is recorded: what disk.create makes)."""
    try:
        fmt = format_path(disk).read_text().strip()
    except FileNotFoundError:
        return "qcow2"
    return fmt if fmt in images.ACCEPTED_FORMATS else "qcow2"
