"""``testbed``: the command line. ``asyncio.run`` happens here and only here.

    testbed lab up [--topology FILE] | lab down | lab status [--json] [--check]
    testbed vm create NAME --host H --memory 512M --disk 1G [--workload SPEC] ...
    testbed vm start|stop|delete NAME | vm list [--json] | vm console-log NAME
    testbed vm heartbeat NAME [--json]
    testbed migrate VM --to-host H [--to-datastore DS] [--streams N] [--converge auto|off] ...
    testbed link set --bandwidth RATE | link show | link cut | link restore
    testbed demo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed import __version__
from testbed.errors import TestbedError
from testbed.paths import default_lab_name
from testbed.units import format_bytes, parse_rate_bytes, parse_size

out = Console()
err = Console(stderr=True)


def _lab_up(a: argparse.Namespace) -> int:
    from testbed import labctl
    from testbed.lab.topology import default_topology, load_topology
    t = load_topology(a.topology) if a.topology else default_topology(a.lab)
    if a.topology and a.lab_given and t.name != a.lab:
        t = t.model_copy(update={"name": a.lab})
    if a.link_bandwidth:
        t = t.model_copy(update={"link": t.link.model_copy(
            update={"bandwidth_bps": parse_rate_bytes(a.link_bandwidth, what="--link-bandwidth")})})
    with out.status(f"building lab {t.name} ..."):
        times = asyncio.run(labctl.up(t))
    n_hosts = len(t.hosts())
    out.print(f"lab [bold]{t.name}[/] is up: {len(t.sites)} sites, {n_hosts} hosts "
              f"in {times['total_s']:.1f} s (network {times['network_s']:.1f} s, "
              f"host agents {times['agents_s']:.1f} s)")
    return 0


def _lab_down(a: argparse.Namespace) -> int:
    from testbed import labctl
    forced, secs = labctl.down(a.lab)
    for f in forced:
        err.print(f"[yellow]warning:[/] {f}")
    out.print(f"lab [bold]{a.lab}[/] is down ({secs:.1f} s); nothing it created is left")
    return 0


def _lab_status(a: argparse.Namespace) -> int:
    from testbed import labctl
    st = asyncio.run(labctl.status(a.lab, check_agents=a.check))
    if a.json:
        print(json.dumps(st, indent=1))
        return 0
    out.print(f"lab [bold]{st['name']}[/]: {st['status']}, accelerator {st['accel']} ({st['accel_reason']})")
    table = Table("host", "site", "vCenter", "management", "vMotion", "state")
    for h in st["hosts"]:
        table.add_row(h["name"], h["site"], h["vcenter"], h["mgmt_address"], h["vmotion_address"], h["state"])
    out.print(table)
    bw = st["link"]["bandwidth_bps"]
    out.print(f"site link: {'uncapped' if bw is None else format_bytes(bw) + '/s'}, MTU {st['link']['mtu']}; "
              f"VM network {st['vm_network']['cidr']}, observer {st['vm_network']['observer']}")
    return 0


def _vm_create(a: argparse.Namespace) -> int:
    from testbed.vms import VmManager
    m = VmManager(a.lab)
    rec = asyncio.run(m.create(
        a.name, a.host, parse_size(a.memory, what="--memory"),
        parse_size(a.disk, what="--disk") if a.disk else None,
        workload=a.workload, datastore=a.datastore, port_group=a.port_group, kernel=a.kernel,
        initrd=a.initrd, append=a.append, image=a.image, vcpus=a.vcpus, start=not a.no_start))
    out.print(f"VM [bold]{rec.name}[/] created on {rec.host} ({rec.ip}, workload {rec.workload})"
              + ("" if a.no_start else ", powered on"))
    return 0


def _vm_simple(action: str) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        from testbed.vms import VmManager
        m = VmManager(a.lab)
        fn: Callable[[str], Coroutine[Any, Any, Any]] = getattr(m, action)
        asyncio.run(fn(a.name))
        out.print(f"VM [bold]{a.name}[/]: {action} done")
        return 0
    return run


def _vm_list(a: argparse.Namespace) -> int:
    from testbed.vms import VmManager
    rows = asyncio.run(VmManager(a.lab).list())
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table("VM", "host", "site", "power", "address", "memory", "disk", "workload", "heartbeat")
    for r in rows:
        age = r["heartbeat_age_s"]
        hb = "never" if age is None else (f"live ({age * 1000:.0f} ms ago)" if age < 1 else f"{age:.1f} s ago")
        table.add_row(r["name"], r["host"], r["site"], r["power"], r["ip"] or "-", format_bytes(r["memory_bytes"]),
                      ", ".join(format_bytes(d["size_bytes"]) for d in r["disks"]) or "-", r["workload"], hb)
    out.print(table)
    return 0


def _vm_console(a: argparse.Namespace) -> int:
    from testbed.vms import VmManager
    sys.stdout.write(asyncio.run(VmManager(a.lab).console_log(a.name)))
    return 0


def _vm_heartbeat(a: argparse.Namespace) -> int:
    import time

    from testbed.vms import VmManager
    since = time.monotonic() - a.last if a.last else None
    st = asyncio.run(VmManager(a.lab).heartbeat_stats(a.name, since_s=since))
    if a.json:
        print(json.dumps(st, indent=1))
        return 0
    if not st["count"]:
        out.print(f"no heartbeat from {a.name} yet")
        return 1
    last = st["last"]
    out.print(f"{a.name}: {st['count']} heartbeats, {st.get('rate_hz')} Hz, max gap {st['max_gap_ms']} ms, "
              f"lost {st['lost']}, last seq {last['seq']}; memory pages written {last['mem_pages_written']}, "
              f"verified {last['mem_pages_verified']}, errors {last['mem_errors']}; disk seq {last['disk_seq']}, "
              f"errors {last['disk_errors']}")
    return 0


def _migrate(a: argparse.Namespace) -> int:
    from rich.live import Live

    from testbed.migration.engine import Progress
    from testbed.ui import progress_line, summary
    from testbed.vms import VmManager
    m = VmManager(a.lab)
    bandwidth = parse_rate_bytes(a.bandwidth, what="--bandwidth") if a.bandwidth else None

    async def go() -> Any:
        with Live(console=out, transient=True, refresh_per_second=8) as live:
            def show(p: Progress) -> None:
                live.update(progress_line(a.vm, p))
            return await m.migrate(a.vm, a.to_host, to_datastore=a.to_datastore, streams=a.streams,
                                   converge=a.converge, bandwidth_bps=bandwidth,
                                   downtime_limit_ms=a.downtime_limit, on_progress=show)

    report = asyncio.run(go())
    out.print(summary(report))
    if a.json:
        from pathlib import Path
        Path(a.json).write_text(report.model_dump_json(indent=1) + "\n")
        out.print(f"report written to {a.json}")
    return 0 if report.result == "succeeded" else 1


def _link_set(a: argparse.Namespace) -> int:
    from testbed import labctl
    if not a.bandwidth:
        return _link_print(labctl.set_link(a.lab))
    bw = None if a.bandwidth == "off" else parse_rate_bytes(a.bandwidth, what="--bandwidth")
    return _link_print(labctl.set_link(a.lab, change_bandwidth=True, bandwidth_bps=bw))


def _link_print(link: dict[str, Any]) -> int:
    bw = link["bandwidth_bps"]
    out.print(f"site-to-site link: {'up' if link['up'] else 'CUT'}, "
              f"{'uncapped' if bw is None else format_bytes(bw) + '/s'}, MTU {link['mtu']} ({link['shaping']})")
    return 0


def _link_updown(up: bool) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        from testbed import labctl
        return _link_print(labctl.set_link(a.lab, up=up))
    return run


def _link_show(a: argparse.Namespace) -> int:
    from testbed import labctl
    return _link_print(labctl.set_link(a.lab))


def _demo(a: argparse.Namespace) -> int:
    from testbed.demo import run_demo
    return asyncio.run(run_demo(a.lab, out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testbed", description="Cross-vCenter vMotion testbed on QEMU.")
    p.add_argument("--version", action="version", version=f"testbed {__version__}")
    p.add_argument("--lab", default=None, help="lab name (default: $TESTBED_LAB or 'tb')")
    sub = p.add_subparsers(dest="cmd", required=True)

    lab = sub.add_parser("lab", help="bring the embedded lab up or down").add_subparsers(dest="sub", required=True)
    s = lab.add_parser("up", help="build the lab: namespaces, networks, sshd and host agent per host")
    s.add_argument("--topology", help="topology YAML (default: 2 sites x 2 hosts)")
    s.add_argument("--link-bandwidth", help="cap the site-to-site link, e.g. 100MiB/s or 1Gbit")
    s.set_defaults(fn=_lab_up)
    s = lab.add_parser("down", help="remove everything the lab created")
    s.set_defaults(fn=_lab_down)
    s = lab.add_parser("status", help="sites, vCenters and hosts")
    s.add_argument("--json", action="store_true")
    s.add_argument("--check", action="store_true", help="also reach every host agent over SSH")
    s.set_defaults(fn=_lab_status)

    vm = sub.add_parser("vm", help="VM lifecycle").add_subparsers(dest="sub", required=True)
    s = vm.add_parser("create", help="create a VM (and power it on)")
    s.add_argument("name")
    s.add_argument("--host", required=True)
    s.add_argument("--memory", default="512M")
    s.add_argument("--disk", help="size of the VM's local disk, e.g. 1G")
    s.add_argument("--workload", default="idle",
                   help="idle | memory:RATE[@WSS] | disk:RATE, comma-joined (e.g. memory:20MB/s@256M,disk:5MB/s)")
    s.add_argument("--datastore", help="datastore on the host (default: its first)")
    s.add_argument("--port-group", help="port group of the NIC (default: the first)")
    s.add_argument("--vcpus", type=int, default=1)
    s.add_argument("--kernel", help="your own guest kernel (instead of the built-in guest)")
    s.add_argument("--initrd", help="initrd for --kernel")
    s.add_argument("--append", help="kernel command line for --kernel (added to the built-in guest's)")
    s.add_argument("--image", help="your own bootable qcow2 image, copied to the datastore as the VM's disk")
    s.add_argument("--no-start", action="store_true", help="create without powering on")
    s.set_defaults(fn=_vm_create)
    for action, helptext in (("start", "power on"), ("stop", "power off"), ("delete", "stop and delete with disks")):
        s = vm.add_parser(action, help=helptext)
        s.add_argument("name")
        s.set_defaults(fn=_vm_simple(action))
    s = vm.add_parser("list", help="VMs, where they run, their heartbeat")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_vm_list)
    s = vm.add_parser("console-log", help="the VM's whole serial console so far")
    s.add_argument("name")
    s.set_defaults(fn=_vm_console)
    s = vm.add_parser("heartbeat", help="what the observer has seen of the VM's heartbeat")
    s.add_argument("name")
    s.add_argument("--last", type=float, help="only the last N seconds")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_vm_heartbeat)

    s = sub.add_parser("migrate", help="live-migrate a VM with its disks to another host (XvMotion phases)")
    s.add_argument("vm")
    s.add_argument("--to-host", required=True)
    s.add_argument("--to-datastore", help="datastore on the destination (default: its first)")
    s.add_argument("--streams", type=int, default=1, help="multifd channels (XvMotion Streams), 1-16")
    s.add_argument("--converge", choices=("auto", "off"), default="auto",
                   help="auto: throttle the guest when it dirties faster than the link sends (auto-converge)")
    s.add_argument("--bandwidth", help="cap the migration itself, e.g. 100MiB/s (the link may cap it too)")
    s.add_argument("--downtime-limit", type=int, default=100,
                   help="QEMU's downtime limit in ms (default 100; QEMU's own default is 300)")
    s.add_argument("--json", help="write the migration report to this file")
    s.set_defaults(fn=_migrate)

    link = sub.add_parser("link", help="the site-to-site link").add_subparsers(dest="sub", required=True)
    s = link.add_parser("set", help="change the link while the lab runs")
    s.add_argument("--bandwidth", help="cap, e.g. 100MiB/s or 1Gbit; 'off' to uncap")
    s.set_defaults(fn=_link_set)
    link.add_parser("show", help="the link's settings").set_defaults(fn=_link_show)
    link.add_parser("cut", help="partition the sites").set_defaults(fn=_link_updown(False))
    link.add_parser("restore", help="undo a cut").set_defaults(fn=_link_updown(True))

    s = sub.add_parser("demo", help="bring a lab up, run the demo, tear it down")
    s.set_defaults(fn=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    a.lab_given = a.lab is not None
    a.lab = a.lab or default_lab_name()
    try:
        return int(a.fn(a))
    except TestbedError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
