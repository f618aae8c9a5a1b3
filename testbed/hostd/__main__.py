"""``testbed-hostd serve|connect``: the host agent's command line.

    testbed-hostd serve [--config HOSTDIR/hostd.json] [--daemon]
        run the agent; with --daemon, detach once it listens and print its PID
        (an agent that already runs is left alone: its PID is printed)
    testbed-hostd connect [--socket HOSTDIR/hostd.sock] [--ticket ID]
        bridge stdin/stdout to the agent (what an SSH session runs); with --ticket (the forced command of a
        peer vCenter's ticket key), the connection is first bound to that ticket: only its scope passes

The host's configuration is where its provisioning put it: --config, else
$TESTBED_HOSTD_CONFIG (the lab's sshd sets it for each namespace host), else
/etc/testbed/hostd.json. ``connect`` finds the agent's socket from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    from testbed.daemon import detach
    ready = detach(log_path, f"testbed-hostd: the agent on {cfg.name}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg.pidfile.write_text(f"{os.getpid()}\n")
    from testbed.hostd.server import serve
    try:
        asyncio.run(serve(cfg, ready))
    finally:
        cfg.pidfile.unlink(missing_ok=True)
    return 0


DEFAULT_CONFIG = "/etc/testbed/hostd.json"


def config_path(given: Path | None) -> Path:
    return given or Path(os.environ.get("TESTBED_HOSTD_CONFIG") or DEFAULT_CONFIG)


def _running_pid(cfg_dir: Path) -> int | None:
    """The PID of this host's agent if one runs and answers on its socket."""
    try:
        pid = int((cfg_dir / "hostd.pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(cfg_dir / "hostd.sock"))
    except OSError:
        return None
    finally:
        sock.close()
    return pid


def _bind(sock: socket.socket, ticket: str) -> bytes | None:
    """Bind the connection to ``ticket`` before any byte of the client's: what came after the answer, or None
    (refused: said on stderr)."""
    from testbed.hostd import protocol
    sock.sendall(protocol.encode({"id": "bind", "method": protocol.BIND_METHOD, "params": {"ticket": ticket}}))
    buf = b""
    while b"\n" not in buf:
        data = sock.recv(65536)
        if not data:
            print(f"testbed-hostd connect: the host agent closed the connection when binding ticket {ticket}",
                  file=sys.stderr)
            return None
        buf += data
    line, rest = buf.split(b"\n", 1)
    try:
        answer = protocol.decode(line)
    except ValueError:
        answer = {"error": {"message": f"not an answer: {line[:200]!r}"}}
    if "error" in answer or answer.get("id") != "bind":
        err = answer.get("error") or {}
        print(f"testbed-hostd connect: {err.get('message', 'ticket refused')}", file=sys.stderr)
        return None
    return rest


def _ticket_id(value: str) -> str:
    from testbed.hostd.protocol import ticket_id_ok
    if not ticket_id_ok(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a ticket id (8 to 64 lower-case hex digits)")
    return value


def _connect(path: str, ticket: str | None = None) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as err:
        print(f"testbed-hostd connect: cannot reach the host agent at {path}: {err.strerror}. "
              "Is it running? (`testbed-hostd serve --config ... --daemon`)", file=sys.stderr)
        return 2
    if ticket is not None:
        rest = _bind(sock, ticket)
        if rest is None:
            sock.close()
            return 3
        if rest:
            os.write(1, rest)

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
    s.add_argument("--config", type=Path, help=f"default: $TESTBED_HOSTD_CONFIG or {DEFAULT_CONFIG}")
    s.add_argument("--daemon", action="store_true", help="detach once listening; print the PID")
    c = sub.add_parser("connect", help="bridge stdio to a running agent")
    c.add_argument("--socket", help="default: hostd.sock in the directory the configuration names")
    c.add_argument("--ticket", type=_ticket_id, help="bind the connection to this ticket first (its scope only)")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        path = config_path(args.config)
        if not path.exists():
            print(f"testbed-hostd: no host configuration at {path}; the host is not provisioned", file=sys.stderr)
            return 2
        from testbed.hostd.config import HostConfig  # not on the `connect` path: every SSH session pays it
        cfg = HostConfig.load(path)
        if args.daemon and (pid := _running_pid(Path(cfg.dir))) is not None:
            print(pid)
            return 0
        return _serve(cfg, args.daemon)
    if args.socket is None:
        path = config_path(None)
        try:
            args.socket = str(Path(json.loads(path.read_text())["dir"]) / "hostd.sock")
        except (OSError, ValueError, KeyError) as err:
            print(f"testbed-hostd connect: cannot read the host configuration {path}: {err}", file=sys.stderr)
            return 2
    return _connect(args.socket, args.ticket)


if __name__ == "__main__":
    sys.exit(main())
