"""What is on a disk: per-MiB digests, and the guest agent's block ring (docs/guest-agent.md).

The image is converted to a sparse raw file beside it (``qemu-img convert -U``,
any format, also for a disk in use), scanned once, and removed.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import zlib
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


async def digest(path: Path, host: str) -> dict[str, Any]:
    if not path.exists():
        raise TestbedError(f"disk {path} does not exist on host {host}")
    raw = path.with_name(f".{path.name}.digest.raw")
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "convert", "-U", "-O", "raw", str(path), str(raw),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    try:
        if proc.returncode != 0:
            raise TestbedError(f"reading disk {path} on host {host} failed: {err.decode().strip()}")
        return await asyncio.to_thread(_scan, raw)
    finally:
        raw.unlink(missing_ok=True)


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
