"""Detaching a service (the host agent, a vCenter) once it is ready: the classic double fork.

    ready = detach(log_path, "the agent on esx-a1")   # the caller prints the PID and exits here
    ... start serving ...
    ready()                                           # tells the caller we listen; it prints our PID

The caller's process waits until the service says it is ready (or dies), so
``serve --daemon`` returns only when the service accepts connections, and
prints its PID for the one who started it to record.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path


def detach(log_path: Path, what: str) -> Callable[[], None]:
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        with os.fdopen(r) as pipe:
            pid = pipe.read().strip()
        if not pid:
            print(f"{what} did not start; see {log_path}", file=sys.stderr)
            sys.stdout.flush()
            os._exit(1)
        print(pid, flush=True)
        os._exit(0)
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

    def ready() -> None:
        os.write(w, f"{os.getpid()}\n".encode())
        os.close(w)
    return ready
