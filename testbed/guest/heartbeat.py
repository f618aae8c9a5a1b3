"""The guest agent's UDP heartbeat (docs/guest-agent.md: 96 bytes, little-endian)."""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Any

MAGIC = b"TBHB"
FORMAT = struct.Struct("<4sHHQQQQQQQ32s")
SIZE = FORMAT.size   # 96

FLAG_MEM_VIOLATION = 1
FLAG_DISK_VIOLATION = 2
FLAG_MEM_ON = 4
FLAG_DISK_ON = 8


@dataclass(frozen=True)
class Heartbeat:
    version: int
    flags: int
    seq: int
    guest_ns: int
    mem_pages_written: int
    mem_pages_verified: int
    mem_errors: int
    disk_seq: int
    disk_errors: int
    vm: str

    @property
    def violation(self) -> bool:
        return bool(self.flags & (FLAG_MEM_VIOLATION | FLAG_DISK_VIOLATION)) or \
            self.mem_errors > 0 or self.disk_errors > 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse(data: bytes) -> Heartbeat | None:
    """The heartbeat in ``data``, or None if it is not one."""
    if len(data) < SIZE or data[:4] != MAGIC:
        return None
    (_, version, flags, seq, gns, mw, mv, me, dseq, derr, name) = FORMAT.unpack_from(data)
    return Heartbeat(version, flags, seq, gns, mw, mv, me, dseq, derr,
                     name.split(b"\0", 1)[0].decode(errors="replace"))


def pack(hb: Heartbeat) -> bytes:
    """For tests: the bytes the guest agent would send."""
    return FORMAT.pack(MAGIC, hb.version, hb.flags, hb.seq, hb.guest_ns, hb.mem_pages_written,
                       hb.mem_pages_verified, hb.mem_errors, hb.disk_seq, hb.disk_errors,
                       hb.vm.encode()[:32].ljust(32, b"\0"))
