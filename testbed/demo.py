"""``testbed demo``: the whole XvMotion story on the embedded lab, then everything torn down.

A VM with a busy workload (memory and disk) runs on a host of site A (vCenter
vc-a); it moves, live, with its local disk, to a host of site B (vCenter vc-b)
over a site link capped at 100 MiB/s, and the summary shows the phases, the
bytes, the rounds, the downtime QEMU reports and the one the VM's users felt,
and the integrity checks.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live

from testbed import labctl
from testbed.lab.topology import LinkSpec, default_topology
from testbed.migration.engine import Progress
from testbed.ui import progress_line, summary
from testbed.vms import VmManager

MiB = 1024**2
LINK_BPS = 100 * MiB


async def run_demo(lab: str, out: Console) -> int:
    t = default_topology(lab)
    t = t.model_copy(update={"link": LinkSpec(bandwidth_bps=LINK_BPS)})
    out.rule("[bold]Testbed demo[/]: Cross-vCenter vMotion of a busy VM with its local disk")
    times = await labctl.up(t)
    out.print(f"lab [bold]{lab}[/] up in {times['total_s']:.1f} s: "
              + "; ".join(f"{s.name} ({s.vcenter.name}, SSO {s.vcenter.sso_domain}): "
                          + ", ".join(h.name for h in s.hosts) for s in t.sites)
              + f"; site link capped at {LINK_BPS // MiB} MiB/s")
    try:
        vms = VmManager(lab)
        t0 = time.monotonic()
        rec = await vms.create("demo-vm", "esx-a1", 512 * MiB, 1024 * MiB,
                               workload="memory:20MB/s@128M,disk:2MB/s")
        out.print(f"VM [bold]demo-vm[/] powered on on esx-a1 ({rec.ip}), 512 MiB, 1 GiB local disk, "
                  f"workload {rec.workload}")
        first = await vms.wait_heartbeat("demo-vm", timeout_s=60, since_s=t0)
        out.print(f"its heartbeat reaches the observer {first:.2f} s after power-on; "
                  "letting the workload run for 3 s")
        import asyncio
        await asyncio.sleep(3)
        out.print("[bold]migrating demo-vm: esx-a1 (vc-a) -> esx-b1 (vc-b)[/]")
        with Live(console=out, transient=True, refresh_per_second=8) as live:
            def show(p: Progress) -> None:
                live.update(progress_line("demo-vm", p))
            report = await vms.migrate("demo-vm", "esx-b1", streams=1, downtime_limit_ms=100, on_progress=show)
        out.print(summary(report))
        rows = {r["name"]: r for r in await vms.list()}
        out.print(f"demo-vm now runs on {rows['demo-vm']['host']} ({rows['demo-vm']['site']}), "
                  f"same address {rows['demo-vm']['ip']}")
        return 0 if report.result == "succeeded" else 1
    finally:
        forced, secs = labctl.down(lab)
        out.print(f"lab {lab} torn down in {secs:.1f} s" + (f" ({len(forced)} processes forced)" if forced else ""))
