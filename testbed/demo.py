"""``testbed demo``: the whole XvMotion story on the embedded lab, then everything torn down.

Two vCenters, each with its own SSO domain and hosts, come up; a VM with a busy
workload (memory and disk) is created through vc-a's API on a host of site A;
vc-a relocates it, live, with its local disk, to a host of site B managed by
vc-b over a site link capped at 100 MiB/s: trust with vc-b's pinned
certificate thumbprint, the named prechecks on both sides, admission at vc-b,
the three XvMotion phases, and the commit in both inventories. The summary
shows the phases, the bytes, the rounds, the downtime QEMU reports and the
one the VM's users felt, and the integrity checks.
"""

from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.live import Live

from testbed import labctl
from testbed.errors import TestbedError
from testbed.lab import builder
from testbed.lab import observer as obs
from testbed.lab.topology import LinkSpec, default_topology
from testbed.migration.report import MigrationReport
from testbed.ui import print_prechecks, summary, task_progress_line
from testbed.vcenter import certs, deploy

MiB = 1024**2
LINK_BPS = 100 * MiB


async def run_demo(lab: str, out: Console) -> int:
    t = default_topology(lab)
    t = t.model_copy(update={"link": LinkSpec(bandwidth_bps=LINK_BPS)})
    out.rule("[bold]Testbed demo[/]: Cross-vCenter vMotion of a busy VM with its local disk")
    with out.status("building the lab, starting two vCenters, adding their hosts ..."):
        times = await deploy.up(t)
    out.print(f"lab [bold]{lab}[/] up in {times['total_s']:.1f} s; site link capped at {LINK_BPS // MiB} MiB/s")
    for v in deploy.status(lab):
        site = next(s for s in t.sites if s.vcenter.name == v["name"])
        out.print(f"  {v['name']} {v['url']} (SSO {v['sso_domain']}): hosts "
                  + ", ".join(h.name for h in site.hosts), highlight=False)
    try:
        a = deploy.client(lab, "vc-a")
        b_cfg = deploy.config_of(lab, "vc-b")
        t0 = time.monotonic()
        vm = await a.apost("/api/vcenter/vm", {
            "name": "demo-vm", "placement": {"host": "esx-a1"}, "memory": "512M", "disk": "1G",
            "workload": "memory:20MB/s@128M,disk:2MB/s"})
        out.print(f"vc-a created VM [bold]demo-vm[/] on esx-a1 ({vm['ip']}), 512 MiB, 1 GiB local disk, "
                  f"workload {vm['workload']}")
        first = await obs.first_heartbeat(builder.LabPaths(lab).observer_socket, "demo-vm", t0, 90)
        if first is None:
            raise TestbedError("demo-vm sent no heartbeat within 90 s of power-on",
                               hint=f"see `testbed --lab {lab} vm console-log demo-vm`")
        out.print(f"its heartbeat reaches the observer {first:.2f} s after power-on; letting the workload run 3 s")
        await asyncio.sleep(3)
        thumb = certs.thumbprint_file(b_cfg.cert)
        out.print(f"[bold]relocating demo-vm: esx-a1 (vc-a) -> esx-b1 (vc-b)[/], pinning {b_cfg.url}'s "
                  f"certificate {thumb[:23]}...", highlight=False)
        r = await a.apost("/api/vcenter/vm/demo-vm", {"spec": {
            "placement": {"host": "esx-b1"},
            "destination_vcenter": deploy.destination_vcenter(b_cfg),
            "options": {"streams": 1, "downtime_limit_ms": 100}}}, params={"action": "relocate"})
        with Live(console=out, transient=True, refresh_per_second=4) as live:
            task = await a.await_task(r["task"], 900,
                                     lambda tk: live.update(task_progress_line("demo-vm", tk)))
        print_prechecks(out, task["prechecks"])
        if task.get("result"):
            out.print(summary(MigrationReport.model_validate(task["result"])))
        ok = task["status"] == "SUCCEEDED"
        if not ok:
            out.print(f"[bold red]relocate failed:[/] {task['error']['message']}", highlight=False)
            return 1
        b = deploy.client(lab, "vc-b")
        where = await b.aget("/api/vcenter/vm/demo-vm")
        in_a = [v["name"] for v in await a.aget("/api/vcenter/vm")]
        out.print(f"vc-b's inventory: demo-vm on {where['host']}, {where['power_state']}, same address "
                  f"{where['ip']}; history " + " -> ".join(f"{h['host']} ({h['vcenter']})" for h in where["history"])
                  + f"; vc-a's inventory: {', '.join(in_a) or 'no VMs'}")
        out.print(f"task {task['id']}: {task['end_time'] - task['start_time']:.1f} s from trust to commit")
        a.close()
        b.close()
        return 0
    finally:
        forced, secs = labctl.down(lab)
        out.print(f"lab {lab} torn down in {secs:.1f} s" + (f" ({len(forced)} processes forced)" if forced else ""))
