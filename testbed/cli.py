"""``testbed``: the command line. ``asyncio.run`` happens here and only here.

    testbed lab up [--topology FILE] | lab down | lab status [--json] [--check]
    testbed vm create NAME --host H --memory 512M --disk 1G [--workload SPEC] ...   (through the vCenters)
    testbed vm start|stop|delete NAME | vm list [--json] | vm console-log NAME
    testbed vm heartbeat NAME [--json]
    testbed relocate VM --dest-vcenter URL --dest-user U --dest-password P --dest-thumbprint T --dest-host H ...
    testbed vcenter list|show|start|stop|restart|reconcile|add-host|remove-host|host-license|trust ...
    testbed task list | task show ID | task watch ID
    testbed migrate VM --to-host H [--to-datastore DS] [--streams N]   (relocate, within or across vCenters)
        [--converge auto-converge|sdps|postcopy|adaptive|off] [--allow-postcopy] [--completion-timeout S] ...
    testbed link set [--rtt 100ms] [--jitter 1ms] [--loss 0.1%] [--bandwidth 1Gbit] [--tcp-buffers auto|kernel|SIZE]
    testbed link show [--json] | link cut | link restore
    testbed experiment downtime-vs-rtt|streams|disk-mirror [--json FILE] [--chart FILE] [--rtts 0,50]
    testbed bench [--runs N] | bench convergence|downtime|wan ...   (each on a lab of its own, with its vCenters)
    testbed scenario list | scenario validate FILE | scenario run FILE [--report DIR] [--repeat N]
    testbed demo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed import __version__
from testbed.errors import InputError, TestbedError
from testbed.paths import default_lab_name
from testbed.units import format_bytes, parse_rate_bytes, parse_size
from testbed.vcenter import limits as lim

out = Console()
err = Console(stderr=True)


def _lab_up(a: argparse.Namespace) -> int:
    from testbed.lab.topology import default_topology, load_topology
    from testbed.vcenter import deploy
    t = load_topology(a.topology) if a.topology else default_topology(a.lab)
    if a.topology and a.lab_given and t.name != a.lab:
        t = t.model_copy(update={"name": a.lab})
    if a.link_bandwidth:
        t = t.model_copy(update={"link": t.link.model_copy(
            update={"bandwidth_bps": parse_rate_bytes(a.link_bandwidth, what="--link-bandwidth")})})
    with out.status(f"building lab {t.name} ..."):
        times = asyncio.run(deploy.up(t))
    n_hosts = len(t.hosts())
    out.print(f"lab [bold]{t.name}[/] is up: {len(t.sites)} sites, {n_hosts} hosts "
              f"in {times['total_s']:.1f} s (network {times['network_s']:.1f} s, "
              f"vCenters {times['vcenters_s']:.1f} s, hosts added {times['add_hosts_s']:.1f} s)")
    for v in deploy.status(t.name):
        out.print(f"  {v['name']}: {v['url']} ({v['address']}), SSO domain {v['sso_domain']}, "
                  f"thumbprint {v['thumbprint']}", highlight=False)
    return 0


def _lab_attach(a: argparse.Namespace) -> int:
    from testbed.vcenter.attach import attach
    lab = a.lab if a.lab_given else "vg"
    timings, entries = asyncio.run(attach(Path(a.dir).resolve(), lab))
    for name, e in entries.items():
        out.print(f"  {name}: added to its vCenter (Vagrant reaches it at {e.user}@{e.hostname}:{e.port})")
    out.print(f"lab [bold]{lab}[/] attached in {timings['total_s']:.1f} s (vCenters {timings['vcenters_s']:.1f} s, "
              f"hosts {timings['add_hosts_s']:.1f} s); `testbed --lab {lab} lab down` detaches it")
    return 0


def _lab_vagrant(a: argparse.Namespace) -> int:
    from testbed import vagrant_lab
    lab = a.lab if a.lab_given else "vg"
    vdir = Path(a.dir).resolve()
    say = lambda s: out.print(f"[bold]vagrant lab:[/] {s}", highlight=False)  # noqa: E731
    if a.action == "up":
        r = vagrant_lab.up(vdir, lab, say)
        t = r["times"]
        out.print(f"lab [bold]{lab}[/] is up in {t['total_s']:.0f} s (vagrant up {t['vagrant_up_s']:.0f} s, "
                  f"attach {t['attach_s']:.0f} s): hosts {', '.join(r['hosts'])} as {r['driver']} domains, "
                  "two vCenters" + (", and the libvirtd this command started" if r["libvirtd"] == "ours" else ""))
        out.print(f"  `testbed --lab {lab} vcenter list` shows the vCenters; `testbed lab vagrant down` "
                  "(or `make vagrant-lab-down`) stops all of it")
        return 0
    for f in vagrant_lab.down(vdir, lab, say):
        err.print(f"[yellow]warning:[/] {f}")
    out.print(f"Vagrant lab [bold]{lab}[/] is down")
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
    from testbed.vcenter import deploy
    vcs = Table("vCenter", "URL", "SSO domain", "service", "thumbprint")
    for v in deploy.status(a.lab):
        vcs.add_row(v["name"], f"{v['url']} ({v['address']})", v["sso_domain"],
                    f"running (pid {v['pid']})" if v["running"] else "[red]down[/]", v["thumbprint"])
    out.print(vcs)
    bw = st["link"]["bandwidth_bps"]
    lk = st["link"]
    out.print(f"site link: {'uncapped' if bw is None else format_bytes(bw) + '/s'}, MTU {lk['mtu']}, "
              f"RTT +{lk.get('rtt_ms', 0):g} ms, loss {lk.get('loss_pct', 0):g}% ({lk.get('mechanism', 'bridge')}), "
              f"host TCP buffers {lk.get('tcp_buffers', {}).get('setting', 'kernel')}; "
              f"VM network {st['vm_network']['cidr']}, observer {st['vm_network']['observer']}")
    return 0


def _vm_create(a: argparse.Namespace) -> int:
    from testbed.cli_vcenter import vm_create
    return vm_create(a)


def _vm_simple(action: str) -> Callable[[argparse.Namespace], int]:
    from testbed.cli_vcenter import vm_action
    fn: Callable[[argparse.Namespace], int] = vm_action(action)
    return fn


def _vm_list(a: argparse.Namespace) -> int:
    from testbed.cli_vcenter import vm_list
    return vm_list(a)


def _vm_console(a: argparse.Namespace) -> int:
    from testbed.cli_vcenter import vm_console
    return vm_console(a)


def _vcenter_fn(name: str) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        from testbed import cli_vcenter
        fn: Callable[[argparse.Namespace], int] = getattr(cli_vcenter, name)
        return fn(a)
    return run


def _vm_heartbeat(a: argparse.Namespace) -> int:
    import time

    from testbed import labctl
    from testbed.lab import observer as obs
    since = time.monotonic() - a.last if a.last else None
    st = asyncio.run(obs.query(labctl.observer_socket(a.lab), {"op": "stats", "vm": a.name, "since_s": since,
                                                               "gap_threshold_ms": 20}))
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
    if st.get("spoofed"):
        out.print(f"[yellow]{st['spoofed']} heartbeat(s) from another address claimed to be {a.name}'s: "
                  "counted, and left out of every figure above[/]")
    return 0


def _migrate(a: argparse.Namespace) -> int:
    from testbed.cli_vcenter import migrate
    return migrate(a)


def _link_set(a: argparse.Namespace) -> int:
    from testbed import labctl
    from testbed.units import parse_duration_us, parse_ppm
    if a.rtt and a.delay:
        raise InputError("give --rtt or --delay (one-way), not both")
    kw: dict[str, Any] = {}
    if a.bandwidth:
        kw.update(change_bandwidth=True,
                  bandwidth_bps=None if a.bandwidth == "off" else parse_rate_bytes(a.bandwidth, what="--bandwidth"))
    if a.rtt:
        kw["delay_us"] = parse_duration_us(a.rtt, what="--rtt") // 2
    if a.delay:
        kw["delay_us"] = parse_duration_us(a.delay, what="--delay")
    if a.jitter:
        kw["jitter_us"] = parse_duration_us(a.jitter, what="--jitter")
    if a.loss:
        kw["loss_ppm"] = parse_ppm(a.loss, what="--loss")
    if a.tcp_buffers:
        if a.tcp_buffers not in ("auto", "kernel", "topology"):
            parse_size(a.tcp_buffers, what="--tcp-buffers")
        kw["tcp_buffers"] = a.tcp_buffers
    return _link_print(labctl.set_link(a.lab, **kw))


def _link_print(link: dict[str, Any], as_json: bool = False) -> int:
    if as_json:
        print(json.dumps(link, indent=1))
        return 0
    bw = link["bandwidth_bps"]
    jitter = f" +-{link['jitter_us'] / 1000:g} ms" if link["jitter_us"] else ""
    out.print(f"site-to-site link: {'up' if link['up'] else 'CUT'}, RTT {link['rtt_ms']:g} ms{jitter}, "
              f"loss {link['loss_pct']:g}%, {'uncapped' if bw is None else format_bytes(bw) + '/s'}, "
              f"MTU {link['mtu']}")
    out.print(f"mechanism: [bold]{link['mechanism']}[/]: {link['shaping']}")
    tcp = link["tcp_buffers"]
    ceilings = ", ".join(f"{h} {'kernel' if c is None else format_bytes(c)}" for h, c in tcp["ceiling_bytes"].items())
    out.print(f"host TCP buffers ({tcp['setting']}): {ceilings}")
    for d, st in (link.get("delay_line") or {}).items():
        if isinstance(st, dict):
            out.print(f"delay line {d}: {st['out']} frames ({format_bytes(st['bytes_out'])}) forwarded, "
                      f"{st['lost']} lost (loss setting), {st['overflow']} dropped (queue full), "
                      f"{st['queued_bytes']} bytes queued")
    return 0


def _link_updown(up: bool) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        from testbed import labctl
        return _link_print(labctl.set_link(a.lab, up=up))
    return run


def _link_show(a: argparse.Namespace) -> int:
    from testbed import labctl
    return _link_print(labctl.set_link(a.lab, counters=True), as_json=a.json)


def _experiment(a: argparse.Namespace) -> int:
    from pathlib import Path

    from testbed.experiments import registry
    from testbed.experiments.chart import svg
    experiments = registry()
    if a.name not in experiments:
        raise InputError(f"no experiment named {a.name!r}",
                         hint="experiments: " + "; ".join(f"{k} ({d})" for k, (_, d) in experiments.items()))
    fn, _ = experiments[a.name]
    from testbed.lab import quality
    quality.refuse_if_busy(f"testbed experiment {a.name}", a.force)
    kw: dict[str, Any] = {}
    if a.rtts:
        kw["rtts"] = [float(x) for x in a.rtts.split(",")]
    if a.streams:
        kw["streams_list"] = [int(x) for x in a.streams.split(",")]
    if a.bandwidth:
        kw["bandwidth_bps"] = parse_rate_bytes(a.bandwidth, what="--bandwidth")
    kw["converge"], kw["downtime_limit_ms"] = a.converge, a.downtime_limit
    with quality.Watch() as watch:
        outcome = asyncio.run(fn(lambda msg: err.print(f"[dim]{msg}[/]", highlight=False), **kw))
    outcome.context["quality"] = q = watch.summary()
    table = Table(*(h for _, h in outcome.columns), title=outcome.title)
    for row in outcome.rows:
        table.add_row(*("-" if row.get(k) is None else str(row.get(k)) for k, _ in outcome.columns))
    out.print(table)
    ctx = outcome.context
    out.print(f"{ctx.get('date')}, {ctx.get('cpus')} x {ctx.get('cpu')}, kernel {ctx.get('kernel')}, "
              f"{ctx.get('qemu')}; load {ctx.get('load_at_start')} -> {ctx.get('load_at_end')}, max 1-minute "
              f"{q['max_load_1m']}, CPU steal {q['steal_pct']}%" + (" [bold red]LOADED: retake on a quiet machine[/]"
                                                                    if q["loaded"] else ""))
    for note in outcome.notes:
        out.print(note)
    if a.json:
        Path(a.json).write_text(json.dumps({"name": outcome.name, "context": ctx, "rows": outcome.rows,
                                            "notes": outcome.notes}, indent=1) + "\n")
        out.print(f"results written to {a.json}")
    if a.chart:
        Path(a.chart).write_text(svg(outcome.panels, f"{outcome.title}: {ctx.get('date')}"))
        out.print(f"chart written to {a.chart}")
    return 0 if all(r.get("result") in (None, "succeeded") for r in outcome.rows) else 1


def _demo(a: argparse.Namespace) -> int:
    from testbed.demo import run_demo
    return asyncio.run(run_demo(a.lab, out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testbed", description="Cross-vCenter vMotion testbed on QEMU.")
    p.add_argument("--version", action="version", version=f"testbed {__version__}")
    p.add_argument("--lab", default=None, help="lab name (default: $TESTBED_LAB or 'tb'); also after the subcommand")
    sub = p.add_subparsers(dest="cmd", required=True)

    lab = sub.add_parser("lab", help="bring the embedded lab up or down").add_subparsers(dest="sub", required=True)
    s = lab.add_parser("up", help="build the lab: namespaces, networks, sshd and host agent per host")
    s.add_argument("--topology", help="topology YAML (default: 2 sites x 2 hosts)")
    s.add_argument("--link-bandwidth", help="cap the site-to-site link, e.g. 100MiB/s or 1Gbit")
    s.set_defaults(fn=_lab_up)
    s = lab.add_parser("down", help="remove everything the lab created")
    s.set_defaults(fn=_lab_down)
    s = lab.add_parser("attach", help="add the hosts of a running Vagrant lab (`vagrant up`) to two new vCenters")
    s.add_argument("--vagrant", action="store_true", required=True, help="the lab is the Vagrantfile's")
    s.add_argument("--dir", default=".", help="directory of the Vagrantfile (default: the current one)")
    s.set_defaults(fn=_lab_attach)
    s = lab.add_parser("vagrant", help="the Vagrant lab from nothing: box, libvirtd, `vagrant up`, attach (or down)")
    s.add_argument("action", choices=("up", "down"))
    s.add_argument("--dir", default=".", help="directory of the Vagrantfile (default: the current one)")
    s.set_defaults(fn=_lab_vagrant)
    s = lab.add_parser("status", help="sites, vCenters and hosts")
    s.add_argument("--json", action="store_true")
    s.add_argument("--check", action="store_true", help="also reach every host agent over SSH")
    s.set_defaults(fn=_lab_status)

    vm = sub.add_parser("vm", help="VM lifecycle").add_subparsers(dest="sub", required=True)
    s = vm.add_parser("create", help="create a VM (and power it on)")
    s.add_argument("name", type=lim.arg_vm_name, help=f"the VM's name: {lim.VM_NAME_RULE}")
    s.add_argument("--host", required=True)
    s.add_argument("--memory", type=lim.arg_memory, default=512 * lim.MiB, help="e.g. 512M (64M to 64G)")
    s.add_argument("--disk", type=lim.arg_disk, help="size of the VM's local disk, e.g. 1G (1M to 2T)")
    s.add_argument("--workload", type=lim.arg_workload, default="idle",
                   help="idle | memory:RATE[@WSS] | disk:RATE, comma-joined (e.g. memory:20MB/s@256M,disk:5MB/s)")
    s.add_argument("--datastore", help="datastore on the host (default: its first)")
    s.add_argument("--port-group", help="port group of the NIC (default: the first)")
    s.add_argument("--vcpus", type=lim.arg_vcpus, default=1, help="1-16")
    s.add_argument("--kernel", metavar="ITEM",
                   help="your own guest kernel (instead of the built-in guest): a content library item "
                        "(`testbed image add FILE` adds one, `testbed image list` shows them)")
    s.add_argument("--initrd", metavar="ITEM", help="initrd for --kernel: a content library item")
    s.add_argument("--append", help="kernel command line for --kernel (added to the built-in guest's)")
    s.add_argument("--image", metavar="ITEM",
                   help="your own bootable qcow2 or raw image, a content library item, copied to the datastore "
                        "as the VM's disk")
    s.add_argument("--no-start", action="store_true", help="create without powering on")
    s.add_argument("--vcenter", help="the vCenter to create it in (default: the host's)")
    s.add_argument("--encrypted", action="store_true", help="LUKS-encrypt the VM's disk")
    s.set_defaults(fn=_vm_create)
    for action, helptext in (("start", "power on"), ("stop", "power off"), ("delete", "stop and delete with disks")):
        s = vm.add_parser(action, help=helptext)
        s.add_argument("name")
        s.set_defaults(fn=_vm_simple(action))
    s = vm.add_parser("list", help="VMs of the lab's vCenters, where they run, their heartbeat")
    s.add_argument("--json", action="store_true")
    s.add_argument("--vcenter", help="only this vCenter's VMs")
    s.set_defaults(fn=_vm_list)
    s = vm.add_parser("console-log", help="the VM's whole serial console so far")
    s.add_argument("name")
    s.set_defaults(fn=_vm_console)
    s = vm.add_parser("source-copies", help="source copies (paused QEMU and disks) that unverified moves kept")
    s.add_argument("--vcenter")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_vcenter_fn("source_copies"))
    s = vm.add_parser("discard-source", help="remove the source copy an unverified (or failed) move kept")
    s.add_argument("name")
    s.add_argument("--vcenter", help="the vCenter that keeps it (default: found by asking each)")
    s.set_defaults(fn=_vcenter_fn("discard_source"))
    s = vm.add_parser("heartbeat", help="what the observer has seen of the VM's heartbeat")
    s.add_argument("name")
    s.add_argument("--last", type=float, help="only the last N seconds")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_vm_heartbeat)

    s = sub.add_parser("migrate", help="live-migrate a VM with its disks to another host (XvMotion phases)")
    s.add_argument("vm")
    s.add_argument("--to-host", required=True)
    s.add_argument("--to-datastore", help="datastore on the destination (default: its first)")
    s.add_argument("--streams", type=lim.arg_streams, default=1, help="multifd channels (XvMotion Streams), 1-16")
    s.add_argument("--converge", choices=lim.CONVERGE_CHOICES, default="adaptive",
                   help="how pre-copy is made to end: auto-converge (alias auto: QEMU's throttle), sdps (stun the "
                        "vCPUs in ms slices from the source host agent), postcopy (switch once pre-copy stalls), "
                        "adaptive (default: SDPS, downtime steps, then post-copy if allowed), off "
                        "(see docs/migration.md)")
    s.add_argument("--allow-postcopy", action=argparse.BooleanOptionalAction, default=False,
                   help="adaptive: allow post-copy as the last resort (default: no)")
    s.add_argument("--completion-timeout", type=lim.arg_completion_timeout, default=None, metavar="SECONDS",
                   help="abort (or fall back to post-copy) after this long in pre-copy (default: 240 s per GiB "
                        "of RAM, at least 60 s; at most 24 h)")
    s.add_argument("--bandwidth", type=lim.arg_bandwidth,
                   help="cap the migration itself, e.g. 100MiB/s (the link may cap it too)")
    s.add_argument("--downtime-limit", type=lim.arg_downtime_limit, default=100,
                   help="QEMU's downtime limit in ms (default 100; QEMU's own default is 300)")
    from testbed.cli_vcenter import add_verdict_options
    add_verdict_options(s)
    s.set_defaults(fn=_migrate)

    link = sub.add_parser("link", help="the site-to-site link").add_subparsers(dest="sub", required=True)
    s = link.add_parser("set", help="change the link while the lab runs")
    s.add_argument("--bandwidth", help="cap, e.g. 100MiB/s or 1Gbit; 'off' to uncap")
    s.add_argument("--rtt", help="round-trip delay added by the link, e.g. 100ms (half each way)")
    s.add_argument("--delay", help="one-way delay, each direction, e.g. 50ms")
    s.add_argument("--jitter", help="+- this much on each direction's delay, e.g. 1ms (never reorders)")
    s.add_argument("--loss", help="random loss per direction, e.g. 0.1%%")
    s.add_argument("--tcp-buffers", help="every host's TCP buffer ceiling: auto (2x bandwidth-delay product), "
                                         "kernel, a size such as 64M, or 'topology' (each host's own setting)")
    s.set_defaults(fn=_link_set)
    s = link.add_parser("show", help="the link's settings, mechanism and delay-line counters")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_link_show)
    link.add_parser("cut", help="partition the sites").set_defaults(fn=_link_updown(False))
    link.add_parser("restore", help="undo a cut").set_defaults(fn=_link_updown(True))

    from testbed.cli_scenarios import register as register_scenarios
    from testbed.cli_vcenter import register
    register(sub)
    register_scenarios(sub)
    from testbed.cli_bench import register as register_bench
    register_bench(sub)

    s = sub.add_parser("demo", help="bring a lab up, run the demo, tear it down")
    s.set_defaults(fn=_demo)

    s = sub.add_parser("experiment", help="run an experiment on a private lab: table plus chart "
                                          "(downtime-vs-rtt, streams, disk-mirror)")
    s.add_argument("name", help="downtime-vs-rtt | streams | disk-mirror")
    s.add_argument("--json", help="write the rows and the machine context to this file")
    s.add_argument("--chart", help="write an SVG chart to this file")
    s.add_argument("--rtts", help="RTTs in ms, comma-separated (default: the experiment's)")
    s.add_argument("--streams", help="multifd channel counts, comma-separated (streams experiment)")
    s.add_argument("--bandwidth", help="the link's bandwidth cap (default 1Gbit)")
    s.add_argument("--converge", choices=("auto-converge", "auto", "sdps", "postcopy", "adaptive", "off"),
                   default="adaptive", help="the convergence mode of every move (default adaptive; in the table title)")
    s.add_argument("--downtime-limit", type=int, default=100, help="QEMU's downtime limit in ms (default 100)")
    s.add_argument("--force", action="store_true",
                   help="start even when the machine is busy (1-minute load above 0.75 per CPU); the report "
                        "marks a run whose load rose above 1.5 per CPU as LOADED either way")
    s.set_defaults(fn=_experiment)
    _lab_everywhere(p)
    return p


def _lab_everywhere(p: argparse.ArgumentParser) -> None:
    """Every subcommand takes ``--lab`` too (before or after it, as the README says)."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in set(action.choices.values()):
                if not any("--lab" in a.option_strings for a in sp._actions):
                    sp.add_argument("--lab", default=argparse.SUPPRESS, help="lab name (default: $TESTBED_LAB "
                                    "or 'tb')")
                _lab_everywhere(sp)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the lab resolved: ``--lab`` (anywhere), else ``$TESTBED_LAB``, else ``tb``;
    ``lab_given`` says whether the user named one (commands with a lab of their own use it only then)."""
    a = build_parser().parse_args(argv)
    a.lab_given = a.lab is not None or bool(os.environ.get("TESTBED_LAB"))
    a.lab = a.lab or default_lab_name()
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
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
