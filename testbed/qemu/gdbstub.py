"""Write a guest's physical memory from outside, through QEMU's gdbstub.

Used to inject faults (a flipped byte in guest RAM) and to prove the guest
agent's memory verification catches them. The gdbstub is opened on a UNIX
socket only for the write (HMP ``gdbserver``), in physical-memory mode
(``Qqemu.PhyMemMode:1``); the guest pauses for a few milliseconds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path


def _frame(body: str) -> bytes:
    return f"${body}#{sum(body.encode()) % 256:02x}".encode()


class GdbStub:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path, timeout_s: float = 5.0) -> GdbStub:
        r, w = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout_s)
        return cls(r, w)

    async def request(self, body: str, timeout_s: float = 5.0) -> str:
        self.writer.write(_frame(body))
        await self.writer.drain()
        return await asyncio.wait_for(self._reply(), timeout_s)

    async def _reply(self) -> str:
        while True:
            c = await self.reader.readexactly(1)
            if c == b"$":
                break       # skip acks ('+') and anything before a packet
        data = await self.reader.readuntil(b"#")
        await self.reader.readexactly(2)
        self.writer.write(b"+")
        return data[:-1].decode()

    async def close(self) -> None:
        self.writer.close()


async def flip_bytes(stub: GdbStub, gpa: int, length: int = 1, detach: bool = True) -> tuple[bytes, bytes]:
    """Invert ``length`` bytes at guest-physical ``gpa``; returns (before, after).

    ``detach`` ends with gdb's detach, which *starts* the VM (QEMU's gdb_continue): right for a guest that was
    running (the connection stopped it), wrong for one that must stay paused, e.g. a destination still
    receiving its migration: there the caller passes False and just closes the connection."""
    if await stub.request("Qqemu.PhyMemMode:1") != "OK":
        raise RuntimeError("this QEMU's gdbstub has no physical-memory mode")
    try:
        old = bytes.fromhex(await stub.request(f"m{gpa:x},{length:x}"))
        new = bytes(b ^ 0xFF for b in old)
        reply = await stub.request(f"M{gpa:x},{length:x}:{new.hex()}")
        if reply != "OK":
            raise RuntimeError(f"gdbstub refused the write at {gpa:#x}: {reply}")
        return old, new
    finally:
        await stub.request("Qqemu.PhyMemMode:0")
        if detach:
            await stub.request("D")
