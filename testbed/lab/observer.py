"""The heartbeat observer: a host on the VM network that every guest agent reports to.

Each VM's heartbeats are bound to the address its vCenter gave it (``bind`` at create, again at a
cross-vCenter registration, ``unbind`` at delete; kept in a file beside the control socket, so a restarted
observer still knows them): a heartbeat that claims a bound VM's name from another address is not that
VM's: it is counted under ``spoofed`` (claimed name, sender, count) and left out of every figure. A name
nobody bound (libvirt's VM in the bench) is taken from any address, as before.

It records, per VM, the kernel's receive time of every heartbeat (converted
to CLOCK_MONOTONIC, the clock every lab process shares) and its sequence
number, so the largest gap around a switchover is the downtime a user of the
VM felt. Queries come as JSON lines on a UNIX socket:

    {"op": "vms"}
    {"op": "stats", "vm": "web01", "since_s": 1234.5, "until_s": null, "gap_threshold_ms": 20}
    {"op": "samples", "vm": "web01", "since_s": 1234.5, "until_s": 1236.0}
    {"op": "overlapping", "vm": "web01", "a_s": 1234.5, "b_s": 1234.6}
    {"op": "bind", "vm": "web01", "address": "198.19.16.3"}
    {"op": "unbind", "vm": "web01"}
    {"op": "bindings"}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import struct
import time
from array import array
from collections import deque
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.guest.heartbeat import Heartbeat, parse
from testbed.lab import topology as topo
from testbed.names import check_vm_name

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
MAX_SAMPLES = 8_000_000     # per VM; the oldest half is dropped beyond this
REPLY_LIMIT = 64 * 1024 * 1024
RECENT = 30_000             # whole heartbeats kept per VM (30 s at 1 kHz): "last" of a past window
MAX_SPOOF_SOURCES = 64      # senders remembered per claimed name (the count goes on beyond)


class Track:
    def __init__(self) -> None:
        self.t = array("d")       # receive time, monotonic seconds
        self.seq = array("Q")
        self.guest_ns = array("Q")
        self.last: Heartbeat | None = None
        self.recent: deque[tuple[float, Heartbeat]] = deque(maxlen=RECENT)   # whole heartbeats, newest last
        self.violations = 0
        self.sources: dict[str, int] = {}

    def last_before(self, until_s: float) -> Heartbeat | None:
        """The newest heartbeat received at or before ``until_s`` (None if older than what is kept)."""
        import bisect
        i = bisect.bisect_right(self.recent, until_s, key=lambda e: e[0])
        if i == 0:
            return None
        return self.recent[i - 1][1]

    def first_after(self, since_s: float) -> Heartbeat | None:
        """The oldest heartbeat received at or after ``since_s`` that is still kept whole."""
        import bisect
        i = bisect.bisect_left(self.recent, since_s, key=lambda e: e[0])
        return self.recent[i][1] if i < len(self.recent) else None

    def add(self, t: float, hb: Heartbeat, src: str) -> None:
        if len(self.t) >= MAX_SAMPLES:
            del self.t[: MAX_SAMPLES // 2]
            del self.seq[: MAX_SAMPLES // 2]
            del self.guest_ns[: MAX_SAMPLES // 2]
        self.t.append(t)
        self.seq.append(hb.seq)
        self.guest_ns.append(hb.guest_ns)
        self.last = hb
        self.recent.append((t, hb))
        if hb.violation:
            self.violations += 1
        self.sources[src] = self.sources.get(src, 0) + 1

    def samples(self, since_s: float, until_s: float, limit: int = 20000) -> list[tuple[float, int, int]]:
        """(receive time, seq, guest clock ns) of each heartbeat in the window."""
        import bisect
        lo, hi = bisect.bisect_left(self.t, since_s), bisect.bisect_right(self.t, until_s)
        return [(self.t[i], self.seq[i], self.guest_ns[i]) for i in range(lo, min(hi, lo + limit))]

    def overlapping(self, a_s: float, b_s: float) -> list[dict[str, Any]]:
        """The gaps between consecutive heartbeats that overlap the interval [a_s, b_s]."""
        import bisect
        lo = max(bisect.bisect_right(self.t, a_s) - 1, 0)
        hi = bisect.bisect_left(self.t, b_s) + 1
        out = []
        for i in range(lo + 1, min(hi, len(self.t))):
            if self.t[i] >= a_s and self.t[i - 1] <= b_s:
                out.append({"start_s": self.t[i - 1], "end_s": self.t[i],
                            "gap_ms": round((self.t[i] - self.t[i - 1]) * 1000, 3),
                            "seq_before": self.seq[i - 1], "seq_after": self.seq[i]})
        return out

    def stats(self, since_s: float | None, until_s: float | None, threshold_ms: float) -> dict[str, Any]:
        import bisect
        lo = bisect.bisect_left(self.t, since_s) if since_s is not None else 0
        hi = bisect.bisect_right(self.t, until_s) if until_s is not None else len(self.t)
        n = hi - lo
        # "last": the newest heartbeat of the window (with until_s), else the newest of all
        last = self.last if until_s is None else self.last_before(until_s)
        first = self.first_after(since_s) if since_s is not None and n else None
        out: dict[str, Any] = {"count": n, "violations_seen": self.violations,
                               "last": last.as_dict() if last else None,
                               "first": first.as_dict() if first else None,
                               "sources": self.sources}
        if n == 0:
            out.update(first_s=None, last_s=None, max_gap_ms=None, gaps=[], lost=0)
            return out
        gaps: list[dict[str, float]] = []
        max_gap = 0.0
        max_at = self.t[lo]
        lost = 0
        for i in range(lo + 1, hi):
            g = (self.t[i] - self.t[i - 1]) * 1000
            ds = self.seq[i] - self.seq[i - 1]
            if ds > 1:
                lost += ds - 1
            if g > max_gap:
                max_gap, max_at = g, self.t[i - 1]
            if g >= threshold_ms and len(gaps) < 5000:
                gaps.append({"start_s": self.t[i - 1], "end_s": self.t[i], "gap_ms": round(g, 3),
                             "seq_before": self.seq[i - 1], "seq_after": self.seq[i]})
        span = self.t[hi - 1] - self.t[lo]
        out.update(first_s=self.t[lo], last_s=self.t[hi - 1], max_gap_ms=round(max_gap, 3),
                   max_gap_at_s=max_at, gaps=gaps, lost=lost,
                   rate_hz=round((n - 1) / span, 1) if span > 0 else None,
                   first_seq=self.seq[lo], last_seq=self.seq[hi - 1])
        return out


def bind_address(address: object) -> str:
    """A VM's heartbeat address: an IPv4 address of the lab's VM network (``198.19.x.y`` or ``.../16``)."""
    try:
        ip = ipaddress.ip_interface(str(address)).ip
    except ValueError:
        raise ValueError(f"address {address!r} is not an IP address") from None
    if ip not in topo.VM_NETWORK or ip in (topo.VM_NETWORK.network_address, topo.VM_NETWORK.broadcast_address):
        raise ValueError(f"address {ip} is not a VM address of the lab's VM network {topo.VM_NETWORK}")
    return str(ip)


class Observer:
    def __init__(self, bindings_file: Path | None = None) -> None:
        self.tracks: dict[str, Track] = {}
        self.offset = time.time() - time.monotonic()   # realtime - monotonic
        self.received = 0
        self.bindings_file = bindings_file
        self.bindings: dict[str, str] = {}              # VM name -> the only address its heartbeats come from
        self.spoofed: dict[str, dict[str, int]] = {}    # claimed VM name -> sender -> heartbeats ignored
        self.spoofed_total = 0
        if bindings_file is not None and bindings_file.exists():
            # a damaged or edited file: start with no bindings, never half of one
            with contextlib.suppress(ValueError, OSError, AttributeError, TestbedError):
                got = json.loads(bindings_file.read_text())
                self.bindings = {check_vm_name(k): bind_address(v) for k, v in got.items()}

    def take(self, t: float, hb: Heartbeat, src: str) -> bool:
        """Record ``hb`` from ``src`` for its VM, unless the VM is bound to another address (then count it)."""
        bound = self.bindings.get(hb.vm)
        if bound is not None and src != bound:
            per = self.spoofed.setdefault(hb.vm, {})
            if src in per or len(per) < MAX_SPOOF_SOURCES:
                per[src] = per.get(src, 0) + 1
            self.spoofed_total += 1
            return False
        self.tracks.setdefault(hb.vm, Track()).add(t, hb, src)
        return True

    def on_readable(self, sock: socket.socket) -> None:
        while True:
            try:
                data, anc, _flags, addr = sock.recvmsg(256, 64)
            except BlockingIOError:
                return
            t = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", payload[:16])
                    t = sec + nsec / 1e9 - self.offset
            if t is None:
                t = time.monotonic()
            hb = parse(data)
            if hb is None:
                continue
            self.received += 1
            self.take(t, hb, addr[0])

    def _save_bindings(self) -> None:
        if self.bindings_file is None:
            return
        tmp = self.bindings_file.with_name(self.bindings_file.name + ".new")
        tmp.write_text(json.dumps(self.bindings, indent=1, sort_keys=True))
        os.replace(tmp, self.bindings_file)

    def bind(self, vm: object, address: object) -> dict[str, Any]:
        name, ip = check_vm_name(vm), bind_address(address)
        # The vCenter that hands out the address knows it is free: a name still bound to it is stale (its VM
        # went while the observer was not told) and gives way.
        replaced = sorted(n for n, a in self.bindings.items() if a == ip and n != name)
        for n in replaced:
            del self.bindings[n]
        before = self.bindings.get(name)
        self.bindings[name] = ip
        self._save_bindings()
        return {"vm": name, "address": ip, "was": before, "replaced": replaced}

    def unbind(self, vm: object) -> dict[str, Any]:
        name = check_vm_name(vm)
        was = self.bindings.pop(name, None)
        self._save_bindings()
        return {"vm": name, "was": was}

    async def resync(self) -> None:
        while True:   # realtime may be stepped; keep the mapping to monotonic fresh
            await asyncio.sleep(5)
            self.offset = time.time() - time.monotonic()

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    resp = self.answer(req)
                except Exception as err:  # a bad query gets an answer, not a dead observer
                    resp = {"error": f"{type(err).__name__}: {err}"}
                writer.write((json.dumps(resp) + "\n").encode())
                await writer.drain()
        finally:
            writer.close()

    def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "vms":
            return {"vms": {name: {"count": len(tr.t), "last_s": tr.t[-1] if tr.t else None,
                                   "bound_to": self.bindings.get(name)}
                            for name, tr in self.tracks.items()},
                    "received": self.received, "spoofed": self.spoofed, "spoofed_total": self.spoofed_total,
                    "now_s": time.monotonic()}
        if op == "bind":
            return self.bind(req.get("vm"), req.get("address"))
        if op == "unbind":
            return self.unbind(req.get("vm"))
        if op == "bindings":
            return {"bindings": dict(self.bindings), "spoofed": self.spoofed, "spoofed_total": self.spoofed_total}
        if op == "stats":
            tr = self.tracks.get(req["vm"])
            if tr is None:
                return {"count": 0, "now_s": time.monotonic(), "max_gap_ms": None, "gaps": [], "last": None}
            out = tr.stats(req.get("since_s"), req.get("until_s"), float(req.get("gap_threshold_ms", 20)))
            out["now_s"] = time.monotonic()
            out["spoofed"] = sum(self.spoofed.get(req["vm"], {}).values())
            return out
        if op == "overlapping":
            tr = self.tracks.get(req["vm"])
            return {"gaps": tr.overlapping(float(req["a_s"]), float(req["b_s"])) if tr else []}
        if op == "samples":
            tr = self.tracks.get(req["vm"])
            return {"samples": tr.samples(float(req["since_s"]), float(req["until_s"])) if tr else []}
        return {"error": f"unknown op {op!r}"}


async def first_heartbeat(control: Path, vm: str, since_s: float, timeout_s: float) -> float | None:
    """Seconds from ``since_s`` until the first heartbeat of ``vm`` after it; None if none in ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = await query(control, {"op": "stats", "vm": vm, "since_s": since_s})
        if st["count"]:
            return float(st["first_s"] - since_s)
        await asyncio.sleep(0.05)
    return None


def bindings_file(control: Path) -> Path:
    """Where the observer of ``control`` keeps its VM bindings (beside the socket, in the lab's directory)."""
    return control.with_name(control.stem + ".bindings.json")


async def set_binding(control: Path, vm: str, address: str | None) -> None:
    """Bind ``vm``'s heartbeats to ``address`` at the observer of ``control``, or unbind them (None).
    Raises ``OSError``/``TimeoutError`` (no observer there) or ``RuntimeError`` (it refused, with why)."""
    await query(control, {"op": "bind", "vm": vm, "address": address} if address else {"op": "unbind", "vm": vm},
                timeout_s=5)


BINDING_ERRORS = (OSError, TimeoutError, RuntimeError, ValueError)


async def main_async(bind: str, port: int, control: Path) -> None:
    obs = Observer(bindings_file(control))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind((bind, port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    loop.add_reader(sock.fileno(), obs.on_readable, sock)
    control.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(obs.control, path=str(control), limit=REPLY_LIMIT)
    resync = asyncio.create_task(obs.resync())
    stop = asyncio.Event()
    import signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    resync.cancel()
    control.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description="heartbeat observer (run inside the lab's observer namespace)")
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, default=7000)
    p.add_argument("--control", required=True, type=Path)
    a = p.parse_args()
    asyncio.run(main_async(a.bind, a.port, a.control))



async def query(control: Path, req: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """Ask the observer one question."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(control), limit=REPLY_LIMIT),
                                            timeout_s)
    try:
        writer.write((json.dumps(req) + "\n").encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    finally:
        writer.close()
    resp: dict[str, Any] = json.loads(line)
    if "error" in resp:
        raise RuntimeError(f"observer: {resp['error']}")
    return resp


if __name__ == "__main__":
    main()
