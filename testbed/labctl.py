"""Lab up, down and status: the lab builder plus each host's own configuration.

``lab.builder`` makes namespaces, wiring, sshd and the observer; ``up`` then
provisions every host (writes its agent's configuration where its sshd
points ``$TESTBED_HOSTD_CONFIG``), like installing ESXi on it. The host
agents are started by the vCenters when they add the hosts
(``testbed.vcenter.deploy.up``, which calls ``up`` first): a lab's hosts run
under its vCenters, never without them.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.hosts import nested
from testbed.hosts.base import Host
from testbed.hosts.netns import LabHost, NetnsHost
from testbed.lab import builder, kinds, wanctl
from testbed.lab import topology as topo
from testbed.lab.state import StateFile, record_alive
from testbed.net import fabric
from testbed.paths import GUEST_IMAGE_DIR, lab_dir, testbed_home
from testbed.qemu import accel

# each kind's runtime (SSH, agent, L1 boot), by the topology's ``kind``; its wiring is testbed.lab.kinds
HOST_CLASSES: dict[str, type[LabHost]] = {c.kind: c for c in (NetnsHost, nested.NestedHost)}


def hosts_of(state: builder.LabState) -> dict[str, LabHost]:
    return {h.name: HOST_CLASSES[h.kind](state, h.name) for *_, h in state.topology.hosts()}


def host(state: builder.LabState, name: str) -> Host:
    state.topology.host(name)   # NotFound with the list of hosts
    return hosts_of(state)[name]


def provision_hosts(state: builder.LabState) -> None:
    for h in hosts_of(state).values():
        h.provision()


async def up(t: topo.Topology) -> dict[str, float]:
    """Build lab ``t`` and provision its hosts; their agents are not started (the vCenters start them as they
    add the hosts: ``testbed.vcenter.deploy.up``). Timings in seconds."""
    t0 = time.monotonic()
    timings_l1: dict[str, float] = {}
    if kinds.hosts(t, kinds.Nested):
        await asyncio.to_thread(nested.check_host_image)   # missing or stale: say so before building anything
    probe = asyncio.create_task(asyncio.to_thread(
        accel.probe, GUEST_IMAGE_DIR / "vmlinuz", testbed_home() / "accel-probe.json"))
    try:
        state = await asyncio.to_thread(builder.build, t)
    except BaseException:
        await asyncio.gather(probe, return_exceptions=True)
        raise
    t_net = time.monotonic()
    try:
        state.accel, state.accel_reason = await probe
        sf = StateFile(lab_dir(t.name))
        with sf.locked():
            saved = sf.load()
            saved.accel, saved.accel_reason = state.accel, state.accel_reason
            sf.save(saved)
        provision_hosts(state)
        t_l1 = time.monotonic()
        l1_boot = await nested.start(state)
        if l1_boot:
            timings_l1 = {"l1_start_s": time.monotonic() - t_l1, "l1_boot_max_s": max(l1_boot.values())}
        builder.mark_up(t.name)
    except BaseException:
        await asyncio.to_thread(builder.teardown, t.name)
        raise
    t1 = time.monotonic()
    return {"network_s": t_net - t0, "agents_s": t1 - t_net, "total_s": t1 - t0, **timings_l1}


def down(name: str) -> tuple[list[str], float]:
    t0 = time.monotonic()
    forced = builder.teardown(name)
    return forced, time.monotonic() - t0


async def status(name: str, check_agents: bool = False) -> dict[str, Any]:
    """The lab as JSON: sites, vCenters, hosts (name, site, addresses, state)."""
    state = builder.load_state(name)
    t = state.topology
    hosts: list[dict[str, Any]] = []
    for si, site, hi, h in t.hosts():
        a, kind = topo.host_addresses(si, hi), kinds.of(h)
        hosts.append({"name": h.name, "site": site.name, "vcenter": site.vcenter.name, "kind": h.kind,
                      "mgmt_address": a.mgmt, "vmotion_address": a.vmotion, "state": kind.status(state, h.name),
                      "netns": kind.netns(t.name, h.name),
                      "datastores": [d.name for d in topo.datastores_of(h)], "license": h.license})
    if check_agents:
        hs = hosts_of(state)

        async def ping(entry: dict[str, Any]) -> None:
            try:
                client = await asyncio.wait_for(hs[entry["name"]].agent(), 15)
                async with client:
                    await client.call("host.ping")
            except (TimeoutError, TestbedError) as err:
                entry["state"] = "unreachable"
                entry["error"] = str(err)
        await asyncio.gather(*(ping(e) for e in hosts))
    vcenters = [{"name": s.vcenter.name, "site": s.name, "sso_domain": s.vcenter.sso_domain,
                 "address": topo.vcenter_address(si), "netns": fabric.ns_name(t.name, s.vcenter.name)}
                for si, s in enumerate(t.sites)]
    return {
        "name": t.name, "status": state.status, "accel": state.accel, "accel_reason": state.accel_reason,
        "sites": [{"name": s.name, "vcenter": s.vcenter.name, "hosts": [h.name for h in s.hosts],
                   "management_network": f"198.18.{si}.0/24", "vmotion_network": f"198.18.{16 + si}.0/24"}
                  for si, s in enumerate(t.sites)],
        "vcenters": vcenters,
        "hosts": hosts,
        "vm_network": {"cidr": str(topo.VM_NETWORK), "port_groups": [p.model_dump() for p in t.port_groups],
                       "observer": f"{topo.OBSERVER_IP}:{topo.OBSERVER_PORT}"},
        "link": link_info(state),
        "namespaces": state.namespaces,
        "processes": [{"role": p.role, "pid": p.pid, "alive": record_alive(p)} for p in state.processes],
        "dir": str(lab_dir(name)),
    }


def set_link(name: str, *, change_bandwidth: bool = False, bandwidth_bps: int | None = None,
             up: bool | None = None, delay_us: int | None = None, jitter_us: int | None = None,
             loss_ppm: int | None = None, tcp_buffers: str | None = None,
             counters: bool = False) -> dict[str, Any]:
    """Change the site-to-site link while the lab runs (None: unchanged): bandwidth cap (None = uncapped
    with ``change_bandwidth``), one-way delay, jitter, loss, hosts' TCP buffers, cut or restore."""
    sf = StateFile(lab_dir(name))
    with sf.locked():
        state = builder.load_state(name)
        if len(state.topology.sites) < 2:
            raise TestbedError(f"lab {name} has one site: there is no site-to-site link")
        shaped = change_bandwidth or delay_us is not None or jitter_us is not None or loss_ppm is not None
        if change_bandwidth:
            state.link_bandwidth_bps = bandwidth_bps
        if delay_us is not None:
            state.link_delay_us = delay_us
        if jitter_us is not None:
            state.link_jitter_us = jitter_us
        if loss_ppm is not None:
            state.link_loss_ppm = loss_ppm
        if shaped:
            wanctl.apply(state, lab_dir(name), bandwidth_changed=change_bandwidth, save=lambda: sf.save(state))
        if tcp_buffers is not None:
            state.tcp_buffers = None if tcp_buffers == "topology" else tcp_buffers
        if shaped or tcp_buffers is not None:
            wanctl.tune_hosts(state)
        if up is not None:
            fabric.set_link_state(state.topology, up)
            state.link_up = up
        sf.save(state)
    return link_info(state, with_counters=counters)


def link_info(state: builder.LabState, with_counters: bool = False) -> dict[str, Any]:
    """The link's settings as ``link show`` and ``lab status`` report them."""
    mech = state.link_mechanism
    shaping = {"netem": "netem (and tbf) on each site's WAN egress",
               "delay-line": ("tb-wan delay line between the site legs in the WAN namespace (no sch_netem here)"
                              if wanctl.delay_line(state) else
                              "bridged: no delay, jitter or loss set (tb-wan starts when one is; no sch_netem here)")
                             + "; tbf on each site's WAN egress for the bandwidth",
               "bridge": "tbf on each site's WAN egress (no delay: no netem, more than two sites)"}.get(mech, mech)
    info: dict[str, Any] = {
        "bandwidth_bps": state.link_bandwidth_bps, "up": state.link_up, "mtu": state.topology.link.mtu,
        "mechanism": mech, "shaping": shaping, "delay_us": state.link_delay_us,
        "rtt_ms": 2 * state.link_delay_us / 1000, "jitter_us": state.link_jitter_us,
        "loss_pct": state.link_loss_ppm / 10_000,
        "tcp_buffers": {"setting": state.tcp_buffers or "per host (topology)",
                        "ceiling_bytes": wanctl.host_buffers(state)},
    }
    if with_counters:
        info["delay_line"] = wanctl.counters(state, lab_dir(state.name))
    return info


def observer_socket(name: str) -> Path:
    return builder.LabPaths(name).observer_socket
