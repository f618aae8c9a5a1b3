"""Scoped tickets: what a peer vCenter's one-off key may do on this host's agent.

For a cross-vCenter move the destination vCenter lets the source vCenter's engine reach this host's agent with a
one-off SSH key whose forced command is ``testbed-hostd connect --ticket ID``. Before it relays a byte of the
client's, that bridge binds its connection to the ticket (``ticket.bind``, the connection's first message; a second
bind, or a bind after any request, is refused: the holder cannot lift the scope).

The scope is written by the destination vCenter over its own, full-API connection (``ticket.grant``; kept in
HOSTDIR/tickets/ID.json, 0600): the one VM, its disks, the spec its incoming QEMU starts with, the methods, the
expiry. Every request of a bound connection is checked against the scope as it is on disk at that moment: once
revoked (``ticket.revoke``, when the move ends) or expired, nothing passes, even on a connection already open.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from testbed.errors import InputError, TicketRefused
from testbed.hostd.protocol import ticket_id_ok
from testbed.qemu.spec import VmSpec, vm_name_ok

# What a move's engine does on its DESTINATION host (testbed.migration), and nothing more: no raw QMP, no import
# of a file, no fault injection, no other VM's start or stop. host.* are the read-only queries its prechecks and
# clocks need (host.facts answers a ticket with its own VM and disks only).
DESTINATION_METHODS = frozenset({
    "host.ping", "host.facts", "host.clock", "events.subscribe",
    "disk.create", "disk.delete",
    "migration.prepare_incoming", "migration.abort_incoming", "migration.pause", "migration.recover",
    "migration.status", "migration.finish",
    "vm.status", "vm.remove", "vm.downtime_trace", "vm.import_console_history", "disk.digest_live",
})

MAX_TTL_S = 24 * 3600.0    # a grant for longer is refused: a ticket is for one move


class DiskRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    datastore: str
    file: str


class TicketScope(BaseModel):
    """One ticket: its VM, the VM's disks (here), the spec of its incoming QEMU, the methods, until when."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    vm: str
    disks: tuple[DiskRef, ...] = ()
    spec: dict[str, Any] | None = None
    methods: tuple[str, ...]
    expires_s: float                 # epoch seconds

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ticket_id_ok(v):
            raise ValueError(f"ticket id {v!r} is not 8 to 64 lower-case hex digits")
        return v

    @field_validator("vm")
    @classmethod
    def _vm(cls, v: str) -> str:
        if not vm_name_ok(v):
            raise ValueError(f"VM name {v!r} is not allowed")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        extra = sorted(set(v) - DESTINATION_METHODS)
        if extra:
            raise ValueError(f"a ticket cannot allow {', '.join(extra)} (only a move's destination methods: "
                             f"{', '.join(sorted(DESTINATION_METHODS))})")
        return v

    @model_validator(mode="after")
    def _spec_is_the_vms(self) -> TicketScope:
        if self.spec is not None:
            s = VmSpec.model_validate(self.spec)
            if s.name != self.vm:
                raise ValueError(f"the spec is of VM {s.name}, the ticket of VM {self.vm}")
            if {DiskRef(datastore=d.datastore, file=d.file) for d in s.disks} != set(self.disks):
                raise ValueError("the spec's disks are not the ticket's disks")
        return self

    def expires_text(self) -> str:
        return datetime.datetime.fromtimestamp(self.expires_s, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Tickets:
    """The tickets granted on this host (a directory of scopes) and the check of a bound connection's request."""

    def __init__(self, directory: Path, host: str) -> None:
        self.dir = directory
        self.host = host

    def _path(self, ticket: object) -> Path:
        if not ticket_id_ok(ticket):
            raise TicketRefused(f"{ticket!r} is not a ticket id on host {self.host}",
                                hint="a ticket id is the hex id the destination vCenter granted")
        return self.dir / f"{ticket}.json"

    def grant(self, scope: dict[str, Any], now: float | None = None) -> TicketScope:
        """Write a ticket's scope (0600; replacing one of the same id); expired ones are removed on the way."""
        try:
            s = TicketScope.model_validate(scope)
        except ValidationError as err:
            raise InputError(f"ticket scope refused on host {self.host}: "
                             + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'scope'}: {e['msg']}"
                                         for e in err.errors())) from None
        now = time.time() if now is None else now
        if not now < s.expires_s <= now + MAX_TTL_S:
            raise InputError(f"ticket {s.id} on host {self.host}: its expiry must be in the next "
                             f"{MAX_TTL_S / 3600:.0f} h (it is {s.expires_s - now:+.0f} s from now)")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._prune(now)
        path = self._path(s.id)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(s.model_dump_json())
        os.replace(tmp, path)
        return s

    def revoke(self, ticket: str) -> bool:
        path = self._path(ticket)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def load(self, ticket: str, now: float | None = None) -> TicketScope:
        """The ticket's scope if it is granted and not expired, else ``TicketRefused``."""
        path = self._path(ticket)
        try:
            s = TicketScope.model_validate_json(path.read_text())
        except (OSError, ValueError):
            raise TicketRefused(f"ticket {ticket} is not granted on host {self.host} (never granted, or revoked "
                                "when its move ended)",
                                hint="ask the destination vCenter to admit the move again") from None
        if s.id != ticket:
            raise TicketRefused(f"ticket {ticket} on host {self.host}: its scope file names ticket {s.id}")
        if (time.time() if now is None else now) >= s.expires_s:
            raise TicketRefused(f"ticket {ticket} on host {self.host} expired at {s.expires_text()}",
                                hint="a ticket lasts one move; ask the destination vCenter to admit the move again")
        return s

    def check(self, ticket: str, method: str, params: dict[str, Any]) -> TicketScope:
        """``TicketRefused`` unless the ticket allows ``method`` with ``params`` now."""
        try:
            s = self.load(ticket)
        except TicketRefused as err:
            raise TicketRefused(f"{method} refused: {err.message}", hint=err.hint) from None
        where = f"ticket {ticket} on host {self.host}"
        hint = (f"a ticket lets the source vCenter move VM {s.vm} to this host and nothing else; anything more "
                "is for the destination vCenter (its own key)")

        def refuse(why: str) -> TicketRefused:
            return TicketRefused(f"{method} refused: {why} ({where}, for VM {s.vm})", hint=hint)

        if method not in s.methods:
            raise refuse("the ticket does not allow this method")
        if "name" in params and params["name"] != s.vm:
            raise refuse(f"VM {params['name']!r} is not the ticket's VM")
        if "datastore" in params or "file" in params:
            d = (params.get("datastore"), params.get("file"))
            if not any(d == (r.datastore, r.file) for r in s.disks):
                raise refuse(f"disk {d[1]!r} on datastore {d[0]!r} is not one of the ticket's disks")
        if "spec" in params:
            try:
                ok = s.spec is not None and VmSpec.model_validate(params["spec"]) == VmSpec.model_validate(s.spec)
            except (ValidationError, TypeError):
                ok = False
            if not ok:
                raise refuse("the VM spec is not the one the ticket was granted for")
        if method == "events.subscribe":
            vms = params.get("vms")
            if not isinstance(vms, list) or not vms or any(v != s.vm for v in vms):
                raise refuse(f"a ticket subscribes to the events of VM {s.vm} only (vms: [{s.vm!r}])")
        return s

    def _prune(self, now: float) -> None:
        for p in self.dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                if float(json.loads(p.read_text())["expires_s"]) <= now:
                    p.unlink()
