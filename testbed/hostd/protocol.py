"""JSON lines between a client and the host agent.

    request   {"id": 7, "method": "vm.start", "params": {...}}
    response  {"id": 7, "result": ...}
              {"id": 7, "error": {"kind": "NotFound", "message": "...", "hint": "..."}}
    event     {"event": "qmp", "vm": "web01", "data": {"event": "STOP", ...}}
              {"event": "vm-exited", "vm": "web01", "data": {"returncode": 0}}

One message per line, UTF-8. Requests may overlap; responses carry the id.
"""

from __future__ import annotations

import json
from typing import Any

MAX_LINE = 64 * 1024 * 1024   # a console log can be large


def encode(msg: dict[str, Any]) -> bytes:
    return (json.dumps(msg, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> dict[str, Any]:
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError("a message must be a JSON object")
    return msg


def error_body(err: BaseException) -> dict[str, Any]:
    from testbed.errors import TestbedError
    if isinstance(err, TestbedError):
        return {"kind": type(err).__name__, "message": err.message, "hint": err.hint}
    return {"kind": type(err).__name__, "message": f"{type(err).__name__}: {err}", "hint": None}
