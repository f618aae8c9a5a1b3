"""JSON lines between a client and the host agent.

    request   {"id": 7, "method": "vm.start", "params": {...}}
    response  {"id": 7, "result": ...}
              {"id": 7, "error": {"kind": "NotFound", "message": "...", "hint": "..."}}
    event     {"event": "qmp", "vm": "web01", "data": {"event": "STOP", ...}}
              {"event": "vm-exited", "vm": "web01", "data": {"returncode": 0}}

    bind      {"id": "bind", "method": "ticket.bind", "params": {"ticket": "3f9a0c..."}}
              the first line of a ticket's connection, sent by ``testbed-hostd connect --ticket ID`` itself

One message per line, UTF-8. Requests may overlap; responses carry the id. An event's kind is one of
``EventKind``; its reader turns it into an ``AgentEvent`` (``AgentEvent.parse``), never a bare dict.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MAX_LINE = 64 * 1024 * 1024   # a console log can be large

BIND_METHOD = "ticket.bind"
# A ticket's id: lower-case hex (``testbed.vcenter.hostconn.new_ticket_id``). It is put into a shell command
# (the ticket key's forced command) and a file name: nothing else passes.
TICKET_ID = re.compile(r"[0-9a-f]{8,64}")


def ticket_id_ok(value: object) -> bool:
    return isinstance(value, str) and TICKET_ID.fullmatch(value) is not None


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


class EventKind(StrEnum):
    """What an agent's event says (the ``event`` field)."""
    QMP = "qmp"                                  # a QMP event of the VM's QEMU: data = {event, data, monotonic_s}
    VM_EXITED = "vm-exited"                      # the VM's QEMU exited: data = {returncode}
    MIGRATION_PROGRESS = "migration-progress"    # the source's sample of query-migrate, once per interval
    MIGRATION_SDPS = "migration-sdps"            # the source's SDPS controller decided a stun
    MIGRATION_SWITCHOVER_HELD = "migration-switchover-held"   # the source holds at pre-switchover (a test)
    MIGRATION_SWITCHOVER = "migration-switchover"   # the source continued past pre-switchover: its instants
    MIGRATION_COMPLETED = "migration-completed"  # the destination saw QEMU's "completed"
    MIGRATION_RESUMED = "migration-resumed"      # the destination resumed the guest: its instants
    MIGRATION_POSTCOPY_PAUSED = "migration-postcopy-paused"     # the destination: post-copy paused
    MIGRATION_POSTCOPY_RECOVER = "migration-postcopy-recover"   # ... and recovering
    MIGRATION_FAILED = "migration-failed"        # either side: data = {role, error?, at_s}
    CONNECTION_LOST = "connection-lost"          # the client lost its agent connection (made by the client)
    MIRROR_COPIED = "mirror-copied"              # the engine's own: a poll found every mirror copied
    OTHER = "other"                              # a kind this reader does not know (kept, not dropped)


@dataclass
class AgentEvent:
    """One event from a host agent. ``side`` is set by whoever reads both agents (the engine)."""

    kind: EventKind
    data: dict[str, Any] = field(default_factory=dict)
    vm: str | None = None
    host: str | None = None
    side: str = ""
    raw_kind: str = ""           # the kind as sent (differs from ``kind`` only for OTHER)

    @classmethod
    def parse(cls, msg: dict[str, Any]) -> AgentEvent:
        raw = str(msg.get("event", ""))
        try:
            kind = EventKind(raw)
        except ValueError:
            kind = EventKind.OTHER
        data = msg.get("data")
        return cls(kind=kind, data=dict(data) if isinstance(data, dict) else {}, vm=msg.get("vm"),
                   host=msg.get("host"), raw_kind=raw)

    @property
    def qmp_event(self) -> str | None:
        """The QMP event's name (``MIGRATION``, ``BLOCK_JOB_READY``, ...), for a ``qmp`` event."""
        return str(self.data.get("event")) if self.kind is EventKind.QMP else None

    @property
    def qmp_data(self) -> dict[str, Any]:
        d = self.data.get("data") if self.kind is EventKind.QMP else None
        return d if isinstance(d, dict) else {}

    @property
    def at_s(self) -> float | None:
        """When it happened on the agent's clock (a QMP event's ``monotonic_s``)."""
        v = self.data.get("monotonic_s")
        return float(v) if isinstance(v, int | float) else None

    def migration_status(self) -> str | None:
        """The status of a QMP ``MIGRATION`` event ("pre-switchover", "completed", ...), else None."""
        if self.qmp_event != "MIGRATION":
            return None
        st = self.qmp_data.get("status")
        return str(st) if st is not None else None
