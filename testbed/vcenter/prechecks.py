"""The named checks of a relocate. Each says what it found and, when it fails, what to do.

All checks run and all are reported; a relocate starts only when none is an
error (warnings are reported and do not stop it). A check that needs both
sides is computed from the facts each side contributes: the source vCenter
gathers the source host's facts and the VM's, the destination vCenter checks
them against its host (``destination``), and the vMotion network is probed
from the source host to ports the destination host opened.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from typing import Any, Literal

Status = Literal["ok", "warning", "error"]
ORDER = ["vm-state", "host-compatibility", "port-groups", "datastore-space", "vmotion-network",
         "name-resolution", "bandwidth", "license", "encryption", "vm-name"]
XVMOTION_EDITIONS = {"enterprise-plus", "evaluation"}


@dataclass
class Check:
    name: str
    status: Status
    message: str
    hint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge(checks: list[Check]) -> list[dict[str, Any]]:
    """One entry per check name (worst status wins, messages joined), in a fixed order."""
    rank = {"ok": 0, "warning": 1, "error": 2}
    by: dict[str, Check] = {}
    for c in checks:
        if c.name not in by:
            by[c.name] = Check(c.name, c.status, c.message, c.hint)
            continue
        m = by[c.name]
        m.message = f"{m.message}; {c.message}"
        if rank[c.status] > rank[m.status]:
            m.status = c.status
            m.hint = c.hint or m.hint
        elif c.hint and m.status == c.status and c.status != "ok":
            m.hint = f"{m.hint}; {c.hint}" if m.hint else c.hint
    return [by[n].as_dict() for n in sorted(by, key=lambda n: ORDER.index(n) if n in ORDER else 99)]


def failed(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in checks if c["status"] == "error"]


def _version(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


# --- checks the destination vCenter runs on its own host ---------------------------------

def destination(vm: dict[str, Any], source_facts: dict[str, Any], host: dict[str, Any], datastore: str,
                registered: set[str], *, vcenter: str, cross: bool = True) -> list[Check]:
    """``vm``: name, machine, cpu_model, port_groups, disk_bytes; ``host``: the inventory row of the target."""
    facts, name, out = host["facts"], host["name"], []
    problems = []
    sv, dv = source_facts.get("qemu_version", "0"), facts.get("qemu_version", "0")
    if _version(dv) < _version(sv):
        problems.append(f"QEMU {dv} on {name} is older than QEMU {sv} on the source host "
                        "(a VM cannot migrate to an older QEMU)")
    if vm["machine"] not in facts.get("machine_types", []):
        problems.append(f"machine type {vm['machine']} is not available on {name} (QEMU {dv})")
    if facts.get("cpu_models") and vm["cpu_model"] not in facts["cpu_models"]:
        problems.append(f"CPU model {vm['cpu_model']} is not available on {name}")
    if problems:
        out.append(Check("host-compatibility", "error", "; ".join(problems),
                         "choose a destination host with the same or a newer QEMU that offers the VM's "
                         "machine type and CPU model"))
    else:
        out.append(Check("host-compatibility", "ok",
                         f"{name}: QEMU {dv} (source {sv}), machine {vm['machine']}, CPU {vm['cpu_model']}"))
    have = {p["name"] for p in facts.get("port_groups", [])}
    missing = [p for p in vm["port_groups"] if p not in have]
    if missing:
        out.append(Check("port-groups", "error",
                         f"port group(s) {', '.join(repr(p) for p in missing)} do not exist on {name} "
                         f"(it has: {', '.join(sorted(have)) or 'none'})",
                         "map the VM's network to one that exists there (--dest-network) or create the port "
                         "group at the destination"))
    else:
        out.append(Check("port-groups", "ok", f"{', '.join(vm['port_groups']) or 'no NICs'} present on {name}"))
    ds = next((d for d in facts.get("datastores", []) if d["name"] == datastore), None)
    if ds is None:
        out.append(Check("datastore-space", "error", f"datastore {datastore!r} is not on host {name}",
                         "datastores there: " + ", ".join(d["name"] for d in facts.get("datastores", []))))
    elif ds["free_bytes"] < vm["disk_bytes"]:
        out.append(Check("datastore-space", "error",
                         f"datastore {datastore} on {name} has {ds['free_bytes'] / 2**30:.1f} GiB free; the VM's "
                         f"disks need {vm['disk_bytes'] / 2**30:.1f} GiB",
                         "choose another datastore, or free space there"))
    else:
        out.append(Check("datastore-space", "ok",
                         f"{datastore} on {name}: {ds['free_bytes'] / 2**30:.1f} GiB free, "
                         f"{vm['disk_bytes'] / 2**30:.1f} GiB needed"))
    out.append(license_check(name, host["license"], vcenter=vcenter, cross=cross))
    if vm["name"] in registered:
        out.append(Check("vm-name", "error", f"a VM named {vm['name']!r} is already in the destination inventory",
                         "rename or remove one of them first"))
    else:
        out.append(Check("vm-name", "ok", f"name {vm['name']} is free at the destination"))
    return out


def license_check(host: str, edition: str, *, vcenter: str, cross: bool = True) -> Check:
    """``vcenter``: the vCenter the host is in, so the hint's command runs as printed."""
    if not cross:
        return Check("license", "ok", f"{host}: {edition} (a move within one vCenter needs no cross-vCenter licence)")
    if edition in XVMOTION_EDITIONS:
        return Check("license", "ok", f"{host}: {edition} allows cross-vCenter vMotion")
    return Check("license", "error",
                 f"host {host} has licence edition {edition!r}, which does not allow cross-vCenter vMotion "
                 f"(needs one of: {', '.join(sorted(XVMOTION_EDITIONS))})",
                 f"assign an enterprise-plus licence to {host} (`testbed vcenter host-license {vcenter} {host} "
                 "enterprise-plus`)")


def resolve(names: list[str], where: str) -> Check:
    bad, good = [], []
    for n in names:
        try:
            addr = socket.getaddrinfo(n, None, socket.AF_INET)[0][4][0]
            good.append(f"{n} -> {addr}")
        except socket.gaierror as err:
            bad.append(f"{n} ({err.strerror})")
    if bad:
        return Check("name-resolution", "error", f"{where} cannot resolve " + ", ".join(bad),
                     "add the names to DNS (in the lab: /etc/netns/<namespace>/hosts) or use addresses")
    return Check("name-resolution", "ok", f"{where}: " + ", ".join(good))


def vmotion(results: list[dict[str, Any]], src: str, dst: str, address: str) -> Check:
    bad = [r for r in results if not r.get("ok")]
    if bad or not results:
        detail = ", ".join(f"port {r['port']}: {r.get('error', 'no answer')}" for r in bad) or "no ports probed"
        return Check("vmotion-network", "error",
                     f"host {src} cannot open TCP connections to {dst}'s vMotion address {address} ({detail})",
                     "check the vMotion network between the hosts (interfaces up, routes, firewall, the "
                     "site-to-site link: `testbed link show`)")
    ms = max(r["connect_ms"] for r in results)
    return Check("vmotion-network", "ok", f"{src} -> {dst} vMotion {address}: migration and NBD test ports "
                                          f"open (connect {ms:.1f} ms)")


def bandwidth(memory_bytes: int, disk_bytes: int, dirty_bps: float | None, link_bps: int | None) -> Check:
    """Estimate the move from its size, the measured dirty rate and the link; warn when it may not converge."""
    if dirty_bps is None:
        return Check("bandwidth", "warning", "the VM's dirty rate could not be measured",
                     "is the VM running?")
    if not link_bps:
        return Check("bandwidth", "ok", f"dirty rate {dirty_bps / 1e6:.1f} MB/s; the link has no cap")
    est = (memory_bytes + disk_bytes) / link_bps
    msg = (f"link {link_bps / 2**20:.0f} MiB/s, dirty rate {dirty_bps / 1e6:.1f} MB/s; about {est:.0f} s to move "
           f"{(memory_bytes + disk_bytes) / 2**30:.2f} GiB")
    if dirty_bps >= 0.8 * link_bps:
        return Check("bandwidth", "warning", msg + ": the guest dirties memory nearly as fast as the link sends, "
                     "so pre-copy may not converge without throttling the guest",
                     "expect the convergence controller (adaptive: SDPS, then downtime steps) to slow the VM; "
                     "give the link more bandwidth or quiet the VM")
    return Check("bandwidth", "ok", msg)
