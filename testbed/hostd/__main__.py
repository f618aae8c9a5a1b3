"""``testbed-hostd serve|connect``: the host agent's command line.

    testbed-hostd serve --config HOSTDIR/hostd.json [--daemon]
        run the agent; with --daemon, detach once it listens and print its PID
    testbed-hostd connect --socket HOSTDIR/hostd.sock
        bridge stdin/stdout to the agent (what an SSH session runs)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.hostd.config import HostConfig


def _serve(cfg: HostConfig, daemon: bool) -> int:
    log_path = Path(cfg.dir) / "hostd.log"
    if not daemon:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        from testbed.hostd.server import serve
        asyncio.run(serve(cfg))
        return 0
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        with os.fdopen(r) as pipe:
            child_pid = pipe.read().strip()
        if not child_pid:
            print(f"testbed-hostd: the agent on {cfg.name} did not start; see {log_path}", file=sys.stderr)
            return 1
        print(child_pid)
        return 0
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg.pidfile.write_text(f"{os.getpid()}\n")

    def ready() -> None:
        os.write(w, f"{os.getpid()}\n".encode())
        os.close(w)

    from testbed.hostd.server import serve
    try:
        asyncio.run(serve(cfg, ready))
    finally:
        cfg.pidfile.unlink(missing_ok=True)
    return 0


def _connect(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as err:
        print(f"testbed-hostd connect: cannot reach the host agent at {path}: {err.strerror}. "
              "Is it running? (`testbed-hostd serve --config ... --daemon`)", file=sys.stderr)
        return 2

    def up() -> None:
        while data := os.read(0, 65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=up, daemon=True).start()
    while data := sock.recv(65536):
        os.write(1, data)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="testbed-hostd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the host agent")
    s.add_argument("--config", required=True, type=Path)
    s.add_argument("--daemon", action="store_true", help="detach once listening; print the PID")
    c = sub.add_parser("connect", help="bridge stdio to a running agent")
    c.add_argument("--socket", required=True)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        from testbed.hostd.config import HostConfig  # not on the `connect` path: every SSH session pays it
        return _serve(HostConfig.load(args.config), args.daemon)
    return _connect(args.socket)


if __name__ == "__main__":
    sys.exit(main())
