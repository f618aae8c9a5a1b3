"""What is on a disk: per-MiB digests, and the guest agent's block ring (docs/guest-agent.md).

``digest``: an image no running QEMU writes (a source frozen at the switchover: its QEMU
inactivated the image when the migration completed) is converted to a sparse raw file beside
it (``qemu-img convert``, any format), scanned once, and removed.

``point_in_time``: a disk a running guest writes is never read from its file (QEMU keeps
metadata in memory: a torn read). It is read through QEMU's own block layer at one instant,
by image fleecing: a ``blockdev-backup`` job with ``sync: none`` into a temporary overlay
whose backing is the disk (copy-before-write: the guest's later writes first save the old
data there), exported read-only over a private NBD socket, with the ``tb-written`` dirty
bitmap (added before the destination resumed) disabled in the same transaction, so the
bitmap says exactly which chunks the guest wrote between its resume and that instant.
Everything is removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import struct
import tempfile
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError

CHUNK = 1024 * 1024
BLOCK = 4096
RING_MAGIC = b"TBRING01"
BLOCK_MAGIC = b"TBDISK01"
_HDR = struct.Struct("<8sQQQII")


def check_block(block: bytes, index: int) -> tuple[int | None, str | None]:
    """(seq, None) for a valid ring block, (None, None) for a never-written one, (seq?, why) if bad."""
    if block[:8] != BLOCK_MAGIC:
        return (None, None) if block.count(0) == BLOCK else (None, "no magic")
    _, seq, idx, _, crc, _ = _HDR.unpack_from(block)
    if zlib.crc32(block[40:]) & 0xFFFFFFFF != crc:
        return seq, "crc"
    if idx != index:
        return seq, f"index {idx} at block {index}"
    return seq, None


class _Ring:
    def __init__(self) -> None:
        self.nblocks = 0
        self.seqs: dict[int, int] = {}
        self.bad: list[dict[str, Any]] = []
        self.bad_count = 0

    def feed(self, offset: int, data: bytes) -> None:
        if offset == 0 and data[:8] == RING_MAGIC:
            self.nblocks = struct.unpack_from("<Q", data, 8)[0]
        if not self.nblocks:
            return
        first = max(1, offset // BLOCK)
        last = min(self.nblocks, (offset + len(data)) // BLOCK)
        for index in range(first, last):
            blk = data[index * BLOCK - offset:(index + 1) * BLOCK - offset]
            seq, why = check_block(blk, index)
            if why:
                self.bad_count += 1
                if len(self.bad) < 20:
                    self.bad.append({"block": index, "seq": seq, "reason": why})
            elif seq is not None:
                self.seqs[index] = seq

    def summary(self) -> dict[str, Any] | None:
        if not self.nblocks:
            return None
        seqs = sorted(self.seqs.values())
        window = self.nblocks - 1
        top = seqs[-window:] if seqs else []
        holes = (top[-1] - top[0] + 1 - len(top)) if top else 0
        return {"nblocks": self.nblocks, "written_blocks": len(seqs), "max_seq": seqs[-1] if seqs else 0,
                "min_seq": seqs[0] if seqs else 0, "holes": holes,
                "bad_blocks": self.bad_count, "bad": self.bad}


WRITTEN_BITMAP = "tb-written"      # on each destination disk node from just before its resume
BITMAP_GRANULARITY = 64 * 1024

Execute = Callable[[str, dict[str, Any] | None], Awaitable[Any]]


async def _qemu_img(*args: str, what: str) -> str:
    proc = await asyncio.create_subprocess_exec("qemu-img", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise TestbedError(f"{what} failed: {err.decode().strip()}")
    return out.decode()


async def digest(path: Path, host: str, fmt: str = "qcow2") -> dict[str, Any]:
    """The digest of a stopped disk of format ``fmt`` (given, never probed: a raw disk's header is the guest's)."""
    if not path.exists():
        raise TestbedError(f"disk {path} does not exist on host {host}")
    raw = path.with_name(f".{path.name}.digest.raw")
    try:
        await _qemu_img("convert", "-U", "-f", fmt, "-O", "raw", str(path), str(raw),
                        what=f"reading disk {path} on host {host}")
        return await asyncio.to_thread(_scan, raw)
    finally:
        raw.unlink(missing_ok=True)


async def point_in_time(execute: Execute, node: str, work: Path, where: str) -> dict[str, Any]:
    """The digest of block node ``node`` of a running QEMU at one instant, and ``written_chunks``: the chunks
    the guest wrote since its resume (from the ``tb-written`` bitmap; None if the node has none).

    ``execute`` runs a QMP command on that QEMU; ``work`` is a private directory for the overlay and the
    socket; ``where`` names the VM and host in errors."""
    nodes = await execute("query-named-block-nodes", {"flat": True})
    me = next((n for n in nodes if n.get("node-name") == node), None)
    if me is None:
        raise TestbedError(f"{where}: no block node {node!r}")
    size = int(me["image"]["virtual-size"])
    has_bitmap = any(b.get("name") == WRITTEN_BITMAP for b in me.get("dirty-bitmaps", []))
    tag = f"tb-fleece-{node}"
    overlay, raw = work / f".{tag}.qcow2", work / f".{tag}.raw"
    sock_dir = Path(tempfile.mkdtemp(prefix="tbf-"))    # 0700; short: a UNIX socket path has 107 bytes
    sock = sock_dir / "nbd.sock"
    for f in (overlay, raw):
        f.unlink(missing_ok=True)
    done: list[tuple[str, dict[str, Any]]] = []     # what to undo, newest last
    try:
        await _qemu_img("create", "-q", "-f", "qcow2", str(overlay), str(size), what=f"{where}: the fleecing overlay")
        await execute("blockdev-add", {"driver": "qcow2", "node-name": tag, "backing": node,
                                       "file": {"driver": "file", "filename": str(overlay)}})
        done.append(("blockdev-del", {"node-name": tag}))
        actions: list[dict[str, Any]] = [{"type": "blockdev-backup", "data": {
            "job-id": tag, "device": node, "target": tag, "sync": "none"}}]
        if has_bitmap:
            actions.append({"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": WRITTEN_BITMAP}})
        await execute("transaction", {"actions": actions})     # the instant: snapshot and bitmap together
        done.append(("block-job-cancel", {"device": tag, "force": True}))
        await execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        done.append(("nbd-server-stop", {}))
        export: dict[str, Any] = {"type": "nbd", "id": tag, "node-name": tag, "name": tag, "writable": False}
        if has_bitmap:
            export["bitmaps"] = [{"node": node, "name": WRITTEN_BITMAP}]
        await execute("block-export-add", export)
        done.append(("block-export-del", {"id": tag}))
        opts = f"driver=nbd,server.type=unix,server.path={sock},export={tag}"
        await _qemu_img("convert", "-O", "raw", "--image-opts", opts, str(raw), what=f"{where}: reading {node}")
        written: list[int] | None = None
        if has_bitmap:
            out = await _qemu_img("map", "--output=json", "--image-opts",
                                  f"{opts},x-dirty-bitmap=qemu:dirty-bitmap:{WRITTEN_BITMAP}",
                                  what=f"{where}: reading the written-since-resume bitmap of {node}")
            written = dirty_chunks(json.loads(out))
        result = await asyncio.to_thread(_scan, raw)
        result.update(written_chunks=written, point_in_time=True)
        return result
    finally:
        for cmd, args in reversed(done):
            with contextlib.suppress(Exception):
                await execute(cmd, args)
            if cmd == "block-job-cancel":
                await _job_gone(execute, tag)
        if has_bitmap:
            with contextlib.suppress(Exception):
                await execute("block-dirty-bitmap-remove", {"node": node, "name": WRITTEN_BITMAP})
        for f in (overlay, raw):
            f.unlink(missing_ok=True)
        shutil.rmtree(sock_dir, ignore_errors=True)


async def _job_gone(execute: Execute, job: str, timeout_s: float = 10.0) -> None:
    """A cancelled job lingers until it has concluded; its target node cannot be deleted before."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(Exception):
            if not any(j.get("device") == job for j in await execute("query-block-jobs", None)):
                return
        await asyncio.sleep(0.05)


def dirty_chunks(entries: list[dict[str, Any]], chunk: int = CHUNK) -> list[int]:
    """Chunks touched by a dirty region of ``qemu-img map`` with ``x-dirty-bitmap`` (dirty reads as no data)."""
    out: set[int] = set()
    for e in entries:
        if not e.get("data") and not e.get("present"):
            first, last = e["start"] // chunk, (e["start"] + e["length"] - 1) // chunk
            out.update(range(first, last + 1))
    return sorted(out)


def _scan(raw: Path) -> dict[str, Any]:
    zero_chunk = bytes(CHUNK)
    zero = hashlib.sha256(zero_chunk).hexdigest()[:16]
    chunks: list[str] = []
    ring = _Ring()
    offset = 0
    with open(raw, "rb") as f:
        while data := f.read(CHUNK):
            chunks.append(zero if data == zero_chunk else hashlib.sha256(data).hexdigest()[:16])
            ring.feed(offset, data)
            offset += len(data)
    return {"size_bytes": offset, "chunk_bytes": CHUNK, "chunks": chunks, "ring": ring.summary()}
