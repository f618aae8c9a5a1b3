"""A lab's vCenter services: set up, start, stop, and add the lab's hosts to them.

``up`` is what ``testbed lab up`` runs: the lab (``labctl.up``), then one
vCenter per site in its namespace (its own certificate, SSO domain with an
administrator whose password is random and kept 0600 in the vCenter's
directory, inventory), then every host of the site added to its vCenter
through the API with the host's root password, the way an administrator
adds ESXi hosts. Two vCenters with the same SSO domain are in enhanced
linked mode: they share the domain's secret and administrator, and trust
each other from the start.

``client`` gives the CLI a logged-in ``VcClient`` for a vCenter of a lab.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed import labctl
from testbed.errors import LabError, NotFound, TestbedError
from testbed.lab import builder, kinds
from testbed.lab import topology as topo
from testbed.lab.state import StateFile, record_alive
from testbed.net import fabric
from testbed.net.cmd import run
from testbed.paths import lab_dir
from testbed.vcenter import certs, sso
from testbed.vcenter.client import VcClient
from testbed.vcenter.config import VcenterConfig
from testbed.vcenter.inventory import Inventory

ROLE = "vcenter "


def vcenter_dir(lab: str, name: str) -> Path:
    return lab_dir(lab) / "vcenters" / name


def config_of(lab: str, name: str) -> VcenterConfig:
    path = vcenter_dir(lab, name) / "vcenter.json"
    if not path.exists():
        raise NotFound(f"lab {lab} has no vCenter {name!r}", hint="`testbed lab status` lists the vCenters")
    return VcenterConfig.load(path)


def admin_password(cfg: VcenterConfig) -> str:
    return (cfg.path / "administrator.password").read_text().strip()


def _secret_file(path: Path, data: bytes | str) -> None:
    path.touch(mode=0o600)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def init(t: topo.Topology, si: int, domain_secret: bytes, password: str) -> VcenterConfig:
    """Create a vCenter's directory: configuration, certificate, SSH key, SSO domain and inventory."""
    site = t.sites[si]
    vc = site.vcenter
    d = vcenter_dir(t.name, vc.name)
    d.mkdir(parents=True)
    cfg = VcenterConfig(name=vc.name, fqdn=topo.fqdn(t, vc.name), address=topo.vcenter_address(si).split("/")[0],
                        dir=str(d), sso_domain=vc.sso_domain, session_ttl_s=vc.session_ttl_s,
                        datacenter=f"dc-{site.name}", cluster=f"cluster-{site.name}", lab=t.name, site_index=si)
    (d / "vcenter.json").write_text(cfg.model_dump_json(indent=1))
    certs.make_self_signed(cfg.cert, cfg.key, cfg.fqdn, [cfg.fqdn, vc.name], cfg.address)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vcenter-{vc.name}", "-f", str(cfg.ssh_key)])
    _secret_file(cfg.domain_secret, domain_secret)
    _secret_file(cfg.path / "administrator.password", password + "\n")
    inv = Inventory(cfg.inventory)
    try:
        inv.put_user(f"administrator@{vc.sso_domain}", sso.hash_password(password), "Admin")
        inv.set_meta("datacenter", cfg.datacenter)
        inv.event("VcenterInstalledEvent", f"vCenter {vc.name} installed: SSO domain {vc.sso_domain}, "
                  f"certificate {certs.thumbprint_file(cfg.cert)}")
    finally:
        inv.close()
    return cfg


def start(lab: str, name: str, timeout_s: float = 30.0) -> int:
    """Start a vCenter's service in its namespace (or find it running); record and return its PID."""
    cfg = config_of(lab, name)
    state = builder.load_state(lab)
    for p in state.processes:
        if p.role == ROLE + name and record_alive(p):
            return p.pid
    ns = fabric.ns_name(lab, name)
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "testbed.vcenter", "serve",
                              "--config", str(cfg.path / "vcenter.json"), "--daemon"],
                             capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise LabError(f"vCenter {name} did not start within {timeout_s:.0f} s", hint=f"see {cfg.log}") from err
    if out.returncode != 0 or not out.stdout.strip().isdigit():
        raise LabError(f"vCenter {name} did not start: {(out.stderr or out.stdout).strip()[-500:]}",
                       hint=f"see {cfg.log}")
    pid = int(out.stdout.strip())
    sf = StateFile(lab_dir(lab))
    with sf.locked():
        st = sf.load()
        st.processes = [p for p in st.processes if p.role != ROLE + name]
        sf.save(st)
    builder.record_process(lab, ROLE + name, pid, ns)
    return pid


def stop(lab: str, name: str, *, kill: bool = False, timeout_s: float = 10.0) -> str:
    """Stop a vCenter's service: SIGTERM (graceful), or SIGKILL with ``kill`` (a crash, for experiments)."""
    config_of(lab, name)
    state = builder.load_state(lab)
    rec = next((p for p in state.processes if p.role == ROLE + name and record_alive(p)), None)
    if rec is None:
        return f"vCenter {name} was not running"
    os.kill(rec.pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while record_alive(rec):
        if time.monotonic() > deadline:
            os.kill(rec.pid, signal.SIGKILL)
        time.sleep(0.05)
    return f"vCenter {name} (pid {rec.pid}) {'killed' if kill else 'stopped'}"


def destination_vcenter(cfg: VcenterConfig) -> dict[str, str]:
    """A relocate's ``destination_vcenter`` for a vCenter of this lab: its URL, its administrator's
    credentials and the thumbprint of its certificate (pinned: nothing is sent to another server)."""
    return {"url": cfg.url, "user_name": f"administrator@{cfg.sso_domain}", "password": admin_password(cfg),
            "thumbprint": certs.thumbprint_file(cfg.cert)}


def client(lab: str, name: str, *, login: bool = True, user: str | None = None,
           password: str | None = None) -> VcClient:
    """A client of vCenter ``name``, connecting from its namespace, pinned to its certificate."""
    cfg = config_of(lab, name)
    c = VcClient(f"https://{cfg.address}" + ("" if cfg.port == 443 else f":{cfg.port}"),
                 thumbprint=certs.thumbprint_file(cfg.cert), netns=fabric.ns_name(lab, name))
    if login:
        c.login(user or f"administrator@{cfg.sso_domain}", password if password is not None else admin_password(cfg))
    return c


def vcenter_of_host(t: topo.Topology, host: str) -> str:
    return t.host(host)[1].vcenter.name


def root_password(lab: str, host: str) -> str:
    p = builder.LabPaths(lab).host_dir(host) / "root-password"
    try:
        return p.read_text().strip()
    except FileNotFoundError:
        raise NotFound(f"no root password recorded for host {host} in lab {lab}") from None


async def up(t: topo.Topology) -> dict[str, float]:
    """The lab, its vCenters, and its hosts added to them. Timings in seconds."""
    timings = await labctl.up(t)
    t0 = time.monotonic()
    try:
        secrets_by_domain: dict[str, tuple[bytes, str]] = {}
        for si, site in enumerate(t.sites):
            dom = site.vcenter.sso_domain
            if dom not in secrets_by_domain:
                secrets_by_domain[dom] = (secrets.token_bytes(32), secrets.token_urlsafe(12))
            await asyncio.to_thread(init, t, si, *secrets_by_domain[dom])
        await asyncio.gather(*(asyncio.to_thread(start, t.name, s.vcenter.name) for s in t.sites))
        _link_mode_trust(t)
        t1 = time.monotonic()

        def add(site: topo.SiteSpec, h: topo.HostSpec) -> int:
            with client(t.name, site.vcenter.name) as c:
                r = c.post("/api/vcenter/host", {"hostname": topo.fqdn(t, h.name), "user_name": "root",
                                                 "password": root_password(t.name, h.name)})
            return int(r["agent_pid"])
        jobs = [(s, h) for s in t.sites for h in s.hosts]
        pids = await asyncio.gather(*(asyncio.to_thread(add, s, h) for s, h in jobs))
        for (_, h), pid in zip(jobs, pids, strict=True):
            ns = kinds.of(h).agent_netns(t.name, h.name)
            if ns is not None:   # None: it runs elsewhere (a nested host's, inside its L1 VM)
                builder.record_process(t.name, f"hostd {h.name}", pid, ns)
    except BaseException:
        await asyncio.to_thread(builder.teardown, t.name)
        raise
    t2 = time.monotonic()
    timings.update(vcenters_s=t1 - t0, add_hosts_s=t2 - t1, total_s=timings["total_s"] + t2 - t0)
    return timings


def _link_mode_trust(t: topo.Topology) -> None:
    """Enhanced linked mode: vCenters of one SSO domain trust each other from the start."""
    by_domain: dict[str, list[str]] = {}
    for s in t.sites:
        by_domain.setdefault(s.vcenter.sso_domain, []).append(s.vcenter.name)
    for names in by_domain.values():
        for a in names:
            for b in names:
                if a == b:
                    continue
                ca, cb = config_of(t.name, a), config_of(t.name, b)
                inv = Inventory(ca.inventory)
                try:
                    inv.put_trust(b, cb.url, certs.thumbprint_file(cb.cert), cb.cert.read_text(), how="linked mode")
                finally:
                    inv.close()


def status(lab: str) -> list[dict[str, Any]]:
    state = builder.load_state(lab)
    out = []
    for s in state.topology.sites:
        try:
            cfg = config_of(lab, s.vcenter.name)
        except TestbedError:
            continue
        rec = next((p for p in state.processes if p.role == ROLE + s.vcenter.name), None)
        out.append({"name": cfg.name, "url": cfg.url, "address": cfg.address, "sso_domain": cfg.sso_domain,
                    "thumbprint": certs.thumbprint_file(cfg.cert), "pid": rec.pid if rec else None,
                    "running": bool(rec and record_alive(rec)), "dir": cfg.dir,
                    "administrator": f"administrator@{cfg.sso_domain}",
                    "password_file": str(cfg.path / "administrator.password")})
    return out
