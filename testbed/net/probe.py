"""Measure a path between two namespaces: RTT with ``ping``, rate with a real TCP transfer.

The TCP transfer uses sockets created inside the namespaces (``socket_in_netns``),
so it crosses exactly what the lab's traffic crosses: veths, site routers, the
WAN (delay line or netem) and the sites' bandwidth caps.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass

from testbed.errors import LabError
from testbed.net.cmd import run, socket_in_netns

_PING_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
_PING_LOSS = re.compile(r"(\d+) packets transmitted, (\d+) received")


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    min_ms: float
    avg_ms: float
    max_ms: float
    mdev_ms: float


def ping(netns: str, address: str, count: int = 10, interval_s: float = 0.05, size: int = 56,
         timeout_s: float = 60.0) -> PingResult:
    """``ping`` from ``netns``; the summary line parsed. ``size`` is the ICMP payload."""
    r = run(["ping", "-n", "-q", "-c", str(count), "-i", str(interval_s), "-s", str(size), "-W", "3", address],
            netns=netns, check=False, timeout=timeout_s)
    m, n = _PING_RTT.search(r.stdout), _PING_LOSS.search(r.stdout)
    if n is None:
        raise LabError(f"ping {address} from {netns} gave no summary: {r.stdout.strip()} {r.stderr.strip()}",
                       hint="is iputils-ping installed (`make setup`)?")
    if m is None:
        return PingResult(int(n.group(1)), int(n.group(2)), 0.0, 0.0, 0.0, 0.0)
    return PingResult(int(n.group(1)), int(n.group(2)), *(float(x) for x in m.groups()))


@dataclass(frozen=True)
class TransferResult:
    bytes: int
    seconds: float
    rate_bps: float            # whole transfer, bytes/s
    steady_rate_bps: float     # the second half of the transfer (after slow start)
    streams: int


def tcp_transfer(src_ns: str, dst_ns: str, dst_ip: str, seconds: float = 5.0, streams: int = 1,
                 port: int = 5201) -> TransferResult:
    """Send as fast as TCP allows from ``src_ns`` to ``dst_ip`` in ``dst_ns`` for ``seconds``."""
    lsock = socket_in_netns(dst_ns)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        lsock.bind((dst_ip, port))
    except OSError as err:
        lsock.close()
        raise LabError(f"cannot listen on {dst_ip}:{port} in {dst_ns}: {err.strerror}") from err
    lsock.listen(streams)
    received = [0] * streams
    marks: list[tuple[float, int]] = []
    stop = threading.Event()

    def receiver(i: int, conn: socket.socket) -> None:
        buf = bytearray(1 << 20)
        with conn:
            while True:
                n = conn.recv_into(buf)
                if n == 0:
                    return
                received[i] += n

    def sender(conn: socket.socket) -> None:
        chunk = b"\0" * (1 << 20)
        with conn:
            while not stop.is_set():
                try:
                    conn.sendall(chunk)
                except OSError:
                    return
            conn.shutdown(socket.SHUT_WR)

    senders, receivers = [], []
    try:
        for i in range(streams):
            c = socket_in_netns(src_ns)
            c.settimeout(10)
            c.connect((dst_ip, port))
            c.settimeout(None)
            conn, _ = lsock.accept()
            receivers.append(threading.Thread(target=receiver, args=(i, conn), daemon=True))
            senders.append(threading.Thread(target=sender, args=(c,), daemon=True))
        t0 = time.monotonic()
        for th in receivers + senders:
            th.start()
        while (now := time.monotonic()) < t0 + seconds:
            marks.append((now, sum(received)))
            time.sleep(0.05)
        stop.set()
        total, t1 = sum(received), time.monotonic()
        for th in senders + receivers:
            th.join(timeout=30)
    finally:
        lsock.close()
    half = [m for m in marks if m[0] >= t0 + seconds / 2]
    steady = (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0]) if len(half) > 1 else 0.0
    return TransferResult(bytes=total, seconds=t1 - t0, rate_bps=total / (t1 - t0), steady_rate_bps=steady,
                          streams=streams)
