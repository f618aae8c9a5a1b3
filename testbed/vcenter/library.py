"""A vCenter's content library: the kernels, initrds and disk images its VMs are made from.

A VM names an item, never a path of a host. An item is a file copied into ``<vCenter dir>/library/items/``
(uploaded through the API, not referenced where it lay), its format read from its header and checked with
``qemu-img info -f <that format>`` (``testbed.qemu.images``): raw kernels and initrds, and qcow2 or raw disks
without a backing or data file. ``catalog.json`` beside ``items/`` records each item's name, kind, format,
size, SHA-256 and when and by whom it was added; handing an item to a host re-checks its digest and that its
path stays inside ``items/``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from testbed.errors import Conflict, InputError, NotFound, TestbedError
from testbed.names import check_item_name, inside
from testbed.qemu import images
from testbed.units import format_bytes

KINDS = ("kernel", "initrd", "disk")
MAX_ITEM_BYTES = 64 * 2**30
_CHUNK = 1 << 20
LIST_HINT = "`testbed image list` shows the content library's items; `testbed image add FILE` adds one"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ContentLibrary:
    """One vCenter's library directory: ``items/`` and ``catalog.json``."""

    def __init__(self, root: Path, vcenter: str) -> None:
        self.root = root
        self.items = root / "items"
        self.catalog_path = root / "catalog.json"
        self.vcenter = vcenter
        self._lock = threading.Lock()

    def discard_partial_uploads(self) -> list[str]:
        """Remove what uploads cut short by a crash left (``.upload-*``): only at start, when none can be running."""
        gone = []
        for p in self.root.glob(".upload-*") if self.root.is_dir() else []:
            p.unlink(missing_ok=True)
            gone.append(p.name)
        return gone

    # --- the catalog ----------------------------------------------------------------------
    def catalog(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.catalog_path.read_text())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, cat: dict[str, dict[str, Any]]) -> None:
        tmp = self.catalog_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cat, indent=1, sort_keys=True))
        os.replace(tmp, self.catalog_path)

    def items_list(self) -> list[dict[str, Any]]:
        return [self.catalog()[n] for n in sorted(self.catalog())]

    def get(self, name: str) -> dict[str, Any]:
        check_item_name(name)
        item = self.catalog().get(name)
        if item is None:
            raise NotFound(f"content library of vCenter {self.vcenter} has no item {name!r}", hint=LIST_HINT)
        return item

    # --- adding ----------------------------------------------------------------------------
    async def add_stream(self, name: str, chunks: AsyncIterator[bytes], *, kind: str | None = None,
                         user: str = "") -> dict[str, Any]:
        """Add ``name`` from the bytes of ``chunks`` (an upload): written to a private file in the library,
        hashed on the way, then checked (``_check``) and renamed into ``items/``."""
        check_item_name(name)
        if kind is not None and kind not in KINDS:
            raise InputError(f"kind {kind!r} is not one of: {', '.join(KINDS)}")
        if name in self.catalog():
            raise Conflict(f"content library of vCenter {self.vcenter} already has an item {name!r}",
                           hint=f"remove it first (`testbed image remove {name}`) or choose another name")
        self.items.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".upload-{os.getpid()}-{time.monotonic_ns()}"
        h, size = hashlib.sha256(), 0
        try:
            with tmp.open("xb") as f:
                os.chmod(tmp, 0o640)
                async for chunk in chunks:
                    size += len(chunk)
                    if size > MAX_ITEM_BYTES:
                        raise InputError(f"item {name!r} is larger than {format_bytes(MAX_ITEM_BYTES)}")
                    h.update(chunk)
                    f.write(chunk)
            return await asyncio.to_thread(self._commit, name, tmp, size, h.hexdigest(), kind, user)
        finally:
            tmp.unlink(missing_ok=True)

    def _commit(self, name: str, tmp: Path, size: int, sha256: str, kind: str | None, user: str) -> dict[str, Any]:
        if size == 0:
            raise InputError(f"item {name!r} is empty", hint="give the file's bytes as the request body")
        fmt, probed_kind, virtual = self._check(name, tmp)
        if kind is None:
            kind = probed_kind
        elif kind in ("kernel", "initrd") and fmt != "raw":
            raise InputError(f"item {name!r} is a {fmt} image; a {kind} is a raw file")
        item = {"name": name, "kind": kind, "format": fmt, "size_bytes": size, "virtual_size_bytes": virtual,
                "sha256": sha256, "added_s": time.time(), "added_by": user}
        with self._lock:
            cat = self.catalog()
            if name in cat:
                raise Conflict(f"content library of vCenter {self.vcenter} already has an item {name!r}")
            os.replace(tmp, self.items / name)
            cat[name] = item
            self._save(cat)
        return item

    def _check(self, name: str, path: Path) -> tuple[str, str, int]:
        """Format, kind and virtual size of the uploaded file, or ``InputError`` with the reason it is refused."""
        fmt = images.probe_format(path)
        if fmt not in images.ACCEPTED_FORMATS:
            raise InputError(f"item {name!r} refused: its format is {fmt}; only qcow2 and raw are accepted",
                             hint=images.REFUSED_HINT)
        try:
            r = subprocess.run(["qemu-img", *images.info_args(path, fmt)], capture_output=True, text=True,
                               timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise TestbedError(f"qemu-img info of item {name!r} on vCenter {self.vcenter} failed: {err}") from err
        if r.returncode != 0:
            raise InputError(f"item {name!r} refused: qemu-img cannot read it as {fmt}: {r.stderr.strip()}",
                             hint=images.REFUSED_HINT)
        info = json.loads(r.stdout)
        problem = images.image_problem(info, fmt)
        if problem:
            raise InputError(f"item {name!r} refused: {problem}", hint=images.REFUSED_HINT)
        return fmt, images.probe_kind(path, fmt), int(info.get("virtual-size", 0))

    # --- removing and using --------------------------------------------------------------------
    def remove(self, name: str) -> dict[str, Any]:
        item = self.get(name)
        with self._lock:
            cat = self.catalog()
            cat.pop(name, None)
            self._save(cat)
            (self.items / name).unlink(missing_ok=True)
        return item

    def path_of(self, name: str) -> Path:
        """Where item ``name`` lies, resolved and checked to stay inside ``items/``."""
        check_item_name(name)
        try:
            return inside(self.items, name, f"content library item of vCenter {self.vcenter}")
        except InputError as err:
            raise InputError(f"content library item {name!r} of vCenter {self.vcenter} resolves outside the "
                             "library", hint="remove the item and add it again") from err

    def resolve(self, name: str, kind: str, what: str) -> tuple[Path, dict[str, Any]]:
        """The path of item ``name`` to hand to a host as a VM's ``what`` (kernel, initrd, image), checked: it
        exists, is of ``kind``, lies inside the library, and its bytes still have the digest recorded."""
        item = self.get(name)
        if item["kind"] != kind:
            raise InputError(f"{what} {name!r}: content library item {name!r} is a {item['kind']}, not a {kind}",
                             hint=LIST_HINT)
        p = self.path_of(name)
        if not p.is_file():
            raise NotFound(f"{what} {name!r}: the file of content library item {name!r} is missing on vCenter "
                           f"{self.vcenter}", hint=f"remove the item (`testbed image remove {name}`) and add it again")
        if _sha256(p) != item["sha256"]:
            raise Conflict(f"{what} {name!r}: content library item {name!r} of vCenter {self.vcenter} changed "
                           "since it was added (its SHA-256 differs)",
                           hint=f"remove it (`testbed image remove {name}`) and add it again")
        return p, item

    def in_use(self, name: str, specs: list[dict[str, Any]]) -> list[str]:
        """The VMs (of ``specs``: inventory rows) that boot from item ``name``'s file."""
        p = str(self.path_of(name))
        return sorted(v["name"] for v in specs
                      if p in ((v.get("spec") or {}).get("boot", {}).get("kernel"),
                               (v.get("spec") or {}).get("boot", {}).get("initrd")))
