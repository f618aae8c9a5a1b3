"""``testbed demo``: the whole story on the embedded lab, then everything torn down."""

from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.table import Table

from testbed import labctl
from testbed.lab.topology import default_topology
from testbed.vms import VmManager

MiB = 1024**2


async def run_demo(lab: str, out: Console) -> int:
    t = default_topology(lab)
    out.rule("[bold]Testbed demo[/]: two vCenters, two sites, a VM with a busy workload")
    times = await labctl.up(t)
    out.print(f"lab [bold]{lab}[/] up in {times['total_s']:.1f} s: "
              + "; ".join(f"{s.name} ({s.vcenter.name}, {s.vcenter.sso_domain}): "
                          + ", ".join(h.name for h in s.hosts) for s in t.sites))
    try:
        vms = VmManager(lab)
        t0 = time.monotonic()
        rec = await vms.create("demo-vm", "esx-a1", 512 * MiB, 1024 * MiB, workload="memory:20MB/s@128M,disk:2MB/s")
        out.print(f"VM [bold]demo-vm[/] powered on on esx-a1 ({rec.ip}), workload {rec.workload}")
        first = await vms.wait_heartbeat("demo-vm", timeout_s=60, since_s=t0)
        out.print(f"first heartbeat at the observer {first:.2f} s after power-on")
        await asyncio.sleep(3)
        st = await vms.heartbeat_stats("demo-vm", since_s=time.monotonic() - 3)
        last = st["last"]
        table = Table(title="demo-vm, last 3 s as the observer saw it")
        for col in ("heartbeats", "rate", "max gap", "lost", "memory pages written / verified",
                    "memory errors", "disk blocks", "disk errors"):
            table.add_column(col)
        table.add_row(str(st["count"]), f"{st['rate_hz']} Hz", f"{st['max_gap_ms']} ms", str(st["lost"]),
                      f"{last['mem_pages_written']} / {last['mem_pages_verified']}", str(last["mem_errors"]),
                      str(last["disk_seq"]), str(last["disk_errors"]))
        out.print(table)
        rows = await vms.list()
        out.print("VM list: " + ", ".join(f"{r['name']} on {r['host']} ({r['power']})" for r in rows))
        ok = last["mem_errors"] == 0 and last["disk_errors"] == 0 and st["count"] > 0
        out.print("[bold green]guest healthy[/]" if ok else "[bold red]guest reports violations[/]")
        return 0 if ok else 1
    finally:
        forced, secs = labctl.down(lab)
        out.print(f"lab {lab} torn down in {secs:.1f} s" + (f" ({len(forced)} processes forced)" if forced else ""))
