"""Adding a host to a vCenter the way vCenter adds an ESXi host, and tickets for peer vCenters.

``add_host``: log in to the host over SSH as root with its password (the
host's SSH key is pinned: checked against the thumbprint given, or recorded
on first use), install the vCenter's own key in root's authorized keys, start
the host agent (or find it running), then reach the agent with the key and
read the host's facts. The password is used once and never stored.

``grant_ticket`` / ``revoke_ticket``: for a cross-vCenter relocate, the
destination vCenter lets the source vCenter's engine reach the destination
host's agent, and nothing else, for a limited time: a one-off key, forced to
``testbed-hostd connect --ticket ID`` (the agent then allows only the ticket's
scope, written before the key: ``testbed.hostd.tickets``), with an expiry,
revoked when the move ends.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from testbed.errors import HostUnreachable, InputError
from testbed.hostd.protocol import ticket_id_ok
from testbed.hosts.base import AGENT_CONNECT, Host, start_agent
from testbed.hosts.ssh import SshSession, SshTarget

AUTH_KEYS = '"${TESTBED_AUTHORIZED_KEYS:-$HOME/.ssh/authorized_keys}"'


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form: SHA256:<base64, no padding>."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class ManagedHost(Host):
    """A host this vCenter manages, reached with the vCenter's own key."""

    kind = "managed"

    def __init__(self, name: str, address: str, key_path: Path, known_hosts: Path, site: str = "") -> None:
        super().__init__(name, site)
        self.address = address
        self.key_path = key_path
        self.known_hosts = known_hosts

    def ssh_target(self) -> SshTarget:
        return SshTarget(host=self.name, address=self.address, key_path=self.key_path,
                         known_hosts=self.known_hosts)


class _Pin(paramiko.MissingHostKeyPolicy):
    def __init__(self, expected: str | None) -> None:
        self.expected = expected
        self.seen: paramiko.PKey | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.seen = key
        if self.expected and fingerprint(key) != self.expected:
            raise InputError(f"host {hostname} presented SSH key {fingerprint(key)}, not the expected "
                             f"{self.expected}; refusing to add it",
                             hint="check the host's key (`ssh-keygen -lf` on its host key) or omit "
                                  "--thumbprint to accept the key it presents")


@dataclass
class Added:
    host_key: str              # "<type> <base64>" for known_hosts
    fingerprint: str
    agent_pid: int


def add_host(address: str, user: str, password: str, *, vc_name: str, pubkey: str,
             thumbprint: str | None = None, timeout_s: float = 10.0) -> Added:
    """Blocking (run it in a thread). Errors say what failed and what to do."""
    client = paramiko.SSHClient()
    pin = _Pin(thumbprint)
    client.set_missing_host_key_policy(pin)
    try:
        client.connect(address, username=user, password=password, timeout=timeout_s, banner_timeout=timeout_s,
                       auth_timeout=timeout_s, look_for_keys=False, allow_agent=False)
    except paramiko.AuthenticationException as err:
        raise InputError(f"host {address} refused user {user!r} with the password given: {err}",
                         hint="give the host's root password (the lab keeps each one in "
                              "labs/<lab>/hosts/<host>/root-password)") from err
    except (paramiko.SSHException, OSError) as err:
        if isinstance(err.__context__, InputError):
            raise err.__context__ from None
        raise HostUnreachable(f"cannot reach host {address} over SSH: {err}",
                              hint="is the address right and the host up (`testbed lab status`)?") from err
    assert pin.seen is not None
    session = SshSession.wrap(client, address)
    try:
        line = f"{pubkey.strip()} vcenter-{vc_name}"
        pid = start_agent(session, first=f'f={AUTH_KEYS}; mkdir -p "$(dirname "$f")" && touch "$f" && '
                                         f'(grep -qxF {shlex.quote(line)} "$f" || '
                                         f'printf "%s\\n" {shlex.quote(line)} >> "$f")')
    finally:
        client.close()
    return Added(host_key=f"{pin.seen.get_name()} {pin.seen.get_base64()}", fingerprint=fingerprint(pin.seen),
                 agent_pid=pid)


def forget_vcenter_key(host: ManagedHost, vc_name: str) -> None:
    """Blocking: remove this vCenter's key from the host (when the host is removed from it)."""
    s = SshSession(host.ssh_target())
    try:
        s.run(f'f={AUTH_KEYS}; grep -v " vcenter-{vc_name}$" "$f" > "$f.new"; cat "$f.new" > "$f"; rm -f "$f.new"')
    finally:
        s.close()


def write_known_host(known_hosts: Path, address: str, host_key: str) -> None:
    lines = [ln for ln in (known_hosts.read_text().splitlines() if known_hosts.exists() else [])
             if ln.split(" ", 1)[0] != address]
    lines.append(f"{address} {host_key}")
    known_hosts.write_text("\n".join(lines) + "\n")


# --- tickets ------------------------------------------------------------------------------

def _checked_ticket_id(ticket_id: str) -> str:
    if not ticket_id_ok(ticket_id):    # it goes into the forced command and a grep pattern
        raise InputError(f"ticket id {ticket_id!r} is not 8 to 64 lower-case hex digits")
    return ticket_id


def ticket_key_line(pub: str, ticket_id: str, ttl_s: float, now: datetime.datetime | None = None) -> str:
    """The ticket key's authorized_keys line: only ``testbed-hostd connect --ticket ID``, no forwarding, no pty,
    refused by sshd after the expiry (rounded up to its minute: the agent enforces the exact instant)."""
    tid = _checked_ticket_id(ticket_id)
    at = (now or datetime.datetime.now(datetime.UTC)) + datetime.timedelta(seconds=ttl_s)
    at = at.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1 if at.second or at.microsecond else 0)
    forced = f"{AGENT_CONNECT} --ticket {tid}".replace('"', '\\"')
    return f'restrict,command="{forced}",expiry-time="{at.strftime("%Y%m%d%H%MZ")}" {pub.strip()} ticket-{tid}'


def grant_ticket(host: ManagedHost, ticket_id: str, ttl_s: float) -> dict[str, Any]:
    """Blocking: a key that may only run the agent of ``host`` bound to ticket ``ticket_id`` (whose scope the
    caller has written on the agent: ``ticket.grant``), until it expires or is revoked."""
    pk = ed25519.Ed25519PrivateKey.generate()
    pem = pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                           serialization.NoEncryption()).decode()
    pub = pk.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    line = ticket_key_line(pub, ticket_id, ttl_s)
    expiry = line.split('expiry-time="', 1)[1].split('"', 1)[0]
    s = SshSession(host.ssh_target())
    try:
        s.run(f'printf "%s\\n" {shlex.quote(line)} >> {AUTH_KEYS}')
    finally:
        s.close()
    host_key = next((ln.split(" ", 1)[1] for ln in host.known_hosts.read_text().splitlines()
                     if ln.split(" ", 1)[0] == host.address), "")
    return {"id": ticket_id, "host": host.name, "address": host.address, "private_key": pem,
            "host_key": host_key, "expires": expiry}


def revoke_ticket(host: ManagedHost, ticket_id: str) -> None:
    _checked_ticket_id(ticket_id)
    s = SshSession(host.ssh_target())
    try:
        s.run(f'f={AUTH_KEYS}; grep -v " ticket-{ticket_id}$" "$f" > "$f.new"; cat "$f.new" > "$f"; '
              'rm -f "$f.new"')
    finally:
        s.close()


class TicketHost(Host):
    """The destination host as a source vCenter reaches it: with a ticket from the destination vCenter."""

    kind = "ticket"

    def __init__(self, ticket: dict[str, Any], workdir: Path) -> None:
        super().__init__(ticket["host"], "")
        workdir.mkdir(parents=True, exist_ok=True)
        self.key_path = workdir / f"ticket-{ticket['id']}"
        self.key_path.touch(mode=0o600)
        self.key_path.write_text(ticket["private_key"])
        self.known_hosts = workdir / f"ticket-{ticket['id']}.known_hosts"
        self.known_hosts.write_text(f"{ticket['address']} {ticket['host_key']}\n")
        self.address = ticket["address"]

    def ssh_target(self) -> SshTarget:
        return SshTarget(host=self.name, address=self.address, key_path=self.key_path,
                         known_hosts=self.known_hosts)

    def discard(self) -> None:
        self.key_path.unlink(missing_ok=True)
        self.known_hosts.unlink(missing_ok=True)


# --- the same for async code (the vCenter's service): paramiko blocks, so each runs in a worker thread -------
async def aadd_host(address: str, user: str, password: str, **kw: Any) -> Added:
    return await asyncio.to_thread(add_host, address, user, password, **kw)


async def aforget_vcenter_key(host: ManagedHost, vc_name: str) -> None:
    await asyncio.to_thread(forget_vcenter_key, host, vc_name)


async def agrant_ticket(host: ManagedHost, ticket_id: str, ttl_s: float) -> dict[str, Any]:
    return await asyncio.to_thread(grant_ticket, host, ticket_id, ttl_s)


async def arevoke_ticket(host: ManagedHost, ticket_id: str) -> None:
    await asyncio.to_thread(revoke_ticket, host, ticket_id)


def new_ticket_id() -> str:
    return secrets.token_hex(6)
