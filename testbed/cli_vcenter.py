"""The commands that talk to the vCenters' HTTPS APIs (part of ``testbed``'s command line).

    testbed vcenter list | show NAME | start|stop|restart NAME [--kill] | reconcile NAME
    testbed vcenter add-host NAME HOSTNAME --host-user root --host-password P [--thumbprint SHA256:...]
    testbed vcenter remove-host NAME HOST | host-license NAME HOST EDITION | trust NAME
    testbed relocate VM --dest-vcenter URL --dest-user U --dest-password P --dest-thumbprint T
                        --dest-host H [--dest-datastore DS] [--dest-network PG] [engine options]
    testbed task list [--vcenter NAME] | task show ID | task watch ID | task continue ID
    testbed image add FILE [--name NAME] [--kind kernel|initrd|disk] | image list | image remove NAME
    testbed vm ... and testbed migrate ... (through the VM's vCenter)

The CLI is a client like any other: it reaches a lab vCenter from that
vCenter's namespace, pins its certificate's thumbprint, and logs in as the
domain's administrator with the password the lab keeps (or --user/--password).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from testbed import cli_images
from testbed.errors import InputError, NotFound
from testbed.lab import builder
from testbed.ui import print_prechecks, task_progress_line
from testbed.vcenter import deploy
from testbed.vcenter import limits as lim
from testbed.vcenter.client import VcClient
from testbed.vcenter.labvms import LabVms

out = Console()


def _client(a: argparse.Namespace, name: str) -> VcClient:
    return deploy.client(a.lab, name, user=getattr(a, "user", None),
                         password=getattr(a, "password", None) or os.environ.get("TESTBED_VC_PASSWORD"))


def _vcenters(lab: str) -> list[str]:
    return [s.vcenter.name for s in builder.load_state(lab).topology.sites]


def vcenter_of_host(lab: str, host: str) -> str:
    return deploy.vcenter_of_host(builder.load_state(lab).topology, host)


def find_vm(a: argparse.Namespace, vm: str) -> tuple[str, VcClient]:
    """The vCenter whose inventory has ``vm`` (the lab's vCenters are asked in turn)."""
    names = [a.vcenter] if getattr(a, "vcenter", None) else _vcenters(a.lab)
    for n in names:
        c = _client(a, n)
        try:
            c.get(f"/api/vcenter/vm/{vm}")
            return n, c
        except NotFound:
            c.close()
    raise NotFound(f"VM {vm!r} is in none of the vCenters of lab {a.lab} ({', '.join(names)})",
                   hint="`testbed vm list` shows the VMs")


# --- vm -----------------------------------------------------------------------------------------
def vm_create(a: argparse.Namespace) -> int:
    own = {k: getattr(a, k) for k in ("kernel", "initrd", "append", "image") if getattr(a, k)}  # library items
    vc = a.vcenter or vcenter_of_host(a.lab, a.host)
    with _client(a, vc) as c:
        r = c.post("/api/vcenter/vm", {"name": a.name, "placement": {"host": a.host, "datastore": a.datastore,
                                                                      "network": a.port_group},
                                       "memory": a.memory, "disk": a.disk, "workload": a.workload,
                                       "cpu_count": a.vcpus, "power_on": not a.no_start,
                                       "encrypted": a.encrypted, **own})
    out.print(f"VM [bold]{r['name']}[/] created in {vc} on {r['host']} ({r['ip']}, workload {r['workload']})"
              + ("" if a.no_start else ", powered on"))
    return 0


def vm_action(action: str) -> Any:
    def run(a: argparse.Namespace) -> int:
        vc, c = find_vm(a, a.name)
        with c:
            if action == "delete":
                c.delete(f"/api/vcenter/vm/{a.name}")
            else:
                c.post(f"/api/vcenter/vm/{a.name}/power", params={"action": action})
        out.print(f"VM [bold]{a.name}[/] ({vc}): {action} done")
        return 0
    return run


def vm_list(a: argparse.Namespace) -> int:
    from testbed.lab import observer as obs
    rows = []
    for vc in ([a.vcenter] if a.vcenter else _vcenters(a.lab)):
        with _client(a, vc) as c:
            rows += [{**r, "vcenter": vc} for r in c.get("/api/vcenter/vm")]
    hb: dict[str, Any] = {}
    try:
        import asyncio
        ans = asyncio.run(obs.query(builder.LabPaths(a.lab).observer_socket, {"op": "vms"}, timeout_s=5))
        hb = {n: (ans["now_s"] - v["last_s"]) if v["last_s"] else None for n, v in ans["vms"].items()}
    except (OSError, TimeoutError, RuntimeError):
        pass
    if a.json:
        print(json.dumps([{**r, "heartbeat_age_s": hb.get(r["name"])} for r in rows], indent=1))
        return 0
    table = Table("VM", "vCenter", "host", "power", "address", "memory", "workload", "heartbeat")
    for r in rows:
        age = hb.get(r["name"])
        beat = "never" if age is None else (f"live ({age * 1000:.0f} ms ago)" if age < 1 else f"{age:.1f} s ago")
        table.add_row(r["name"], r["vcenter"], r["host"], r["power_state"], r["ip"] or "-",
                      f"{r['memory_size_MiB']} MiB", r["workload"], beat)
    out.print(table)
    return 0


def vm_console(a: argparse.Namespace) -> int:
    _, c = find_vm(a, a.name)
    with c:
        sys.stdout.write(c.get(f"/api/vcenter/vm/{a.name}/console")["text"])
    return 0


# --- relocate and migrate -------------------------------------------------------------------------
def _options(a: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {"streams": a.streams, "converge": a.converge, "allow_postcopy": a.allow_postcopy,
                         "downtime_limit_ms": a.downtime_limit, "completion_timeout_s": a.completion_timeout}
    if a.bandwidth:
        o["bandwidth"] = a.bandwidth     # bytes/s: checked by its argument type (testbed.vcenter.limits)
    if a.accept_unverified:
        o["accept_unverified"] = True
    return {k: v for k, v in o.items() if v is not None}


def watch(c: VcClient, task_id: str, vm: str, json_path: str | None = None) -> int:
    """Follow a relocate task to its end; print prechecks, the engine's summary and the outcome."""
    from testbed.migration.report import MigrationReport
    from testbed.ui import summary
    try:
        with Live(console=out, transient=True, refresh_per_second=4) as live:
            # no client-side limit: the move has its own (completion timeout, stall timeout) and ends the task
            t = c.wait_task(task_id, timeout_s=None, on_update=lambda t: live.update(task_progress_line(vm, t)))
    except KeyboardInterrupt:
        out.print(f"detached: task {task_id} goes on in its vCenter; `testbed task watch {task_id}` follows it "
                  "again", highlight=False)
        return 130
    print_prechecks(out, t.get("prechecks", []))
    if t.get("result"):
        out.print(summary(MigrationReport.model_validate(t["result"])))
    if json_path:   # on every outcome: the report, or (no engine run, e.g. failed prechecks) the task's end
        from pathlib import Path
        Path(json_path).write_text(json.dumps(t["result"] or {
            "task": task_id, "status": t["status"], "verdict": t.get("verdict"), "error": t.get("error"),
            "prechecks": t.get("prechecks", []), "notes": t.get("notes", [])}, indent=1) + "\n")
        out.print(f"{'report' if t.get('result') else 'task outcome'} written to {json_path}")
    for n in t.get("notes", []):
        out.print(f"  note: {n}")
    if t["status"] == "SUCCEEDED" and t.get("verdict") == "unverified":
        kept = not (t.get("result") or {}).get("accepted_unverified")
        out.print(f"[bold yellow]task {task_id} succeeded, unverified:[/] {vm} runs on the destination, but a check "
                  "could not be made" + (f"; its source copy is kept paused (`testbed vm discard-source {vm}` "
                                         "removes it)" if kept else "; committed anyway (--accept-unverified)"),
                  highlight=False)
        return 2
    if t["status"] == "SUCCEEDED":
        out.print(f"[bold green]task {task_id} succeeded, verified[/]")
        return 0
    e = t.get("error") or {}
    out.print(f"[bold red]task {task_id} failed:[/] {e.get('message')}", highlight=False)
    if e.get("hint"):
        out.print(f"  what to do: {e['hint']}", highlight=False)
    return 1


def relocate(a: argparse.Namespace) -> int:
    src, c = find_vm(a, a.vm)
    dest = {"url": a.dest_vcenter, "user_name": a.dest_user,
            "password": a.dest_password or os.environ.get("TESTBED_DEST_PASSWORD"), "thumbprint": a.dest_thumbprint}
    with c:
        r = c.post(f"/api/vcenter/vm/{a.vm}", {"spec": {
            "placement": {"host": a.dest_host, "datastore": a.dest_datastore, "network": a.dest_network},
            "destination_vcenter": {k: v for k, v in dest.items() if v is not None},
            "options": _options(a)}}, params={"action": "relocate"})
        out.print(f"relocate of {a.vm} from {src} to {a.dest_host} at {a.dest_vcenter}: task {r['task']}")
        return watch(c, r["task"], a.vm, a.json)


def migrate(a: argparse.Namespace) -> int:
    """``testbed migrate VM --to-host H``: within the VM's vCenter, or to the lab's other vCenter."""
    src, c = find_vm(a, a.vm)
    vms = LabVms(a.lab)     # the one builder of a relocate spec within or across the lab's vCenters
    dst = vms.vcenter_of_host(a.to_host)
    spec = vms.relocate_spec(src, a.to_host, datastore=a.to_datastore, options=_options(a))
    with c:
        r = c.post(f"/api/vcenter/vm/{a.vm}", {"spec": spec}, params={"action": "relocate"})
        out.print(f"{'cross-vCenter ' if dst != src else ''}relocate of {a.vm}: {src} -> {dst} "
                  f"({a.to_host}): task {r['task']}")
        return watch(c, r["task"], a.vm, a.json)


# --- tasks ---------------------------------------------------------------------------------------------
def _find_task(a: argparse.Namespace, tid: str) -> tuple[VcClient, dict[str, Any]]:
    for n in ([a.vcenter] if a.vcenter else _vcenters(a.lab)):
        c = _client(a, n)
        try:
            return c, c.get(f"/api/cis/tasks/{tid}")
        except NotFound:
            c.close()
    raise NotFound(f"task {tid!r} is in none of the vCenters of lab {a.lab}", hint="`testbed task list`")


def task_list(a: argparse.Namespace) -> int:
    rows = []
    for n in ([a.vcenter] if a.vcenter else _vcenters(a.lab)):
        with _client(a, n) as c:
            rows += c.get("/api/cis/tasks")
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table("task", "vCenter", "operation", "target", "status", "verdict", "phase", "%", "prechecks",
                  "started", "description")
    for t in sorted(rows, key=lambda t: t["start_time"]):
        p = t.get("progress") or {}
        checks = t.get("prechecks") or []
        bad = [c["name"] for c in checks if c["status"] == "error"]
        table.add_row(t["id"], t["vcenter"], t["operation"], t["target"], t["status"], t.get("verdict") or "",
                      str(p.get("phase", "")), str(p.get("percent", "")),
                      ("failed: " + ", ".join(bad)) if bad else (f"{len(checks)} ok" if checks else ""),
                      time.strftime("%H:%M:%S", time.localtime(t["start_time"])), t["description"])
    out.print(table)
    return 0


def task_show(a: argparse.Namespace) -> int:
    c, t = _find_task(a, a.id)
    c.close()
    print(json.dumps(t, indent=1))
    return 0


def task_watch(a: argparse.Namespace) -> int:
    c, t = _find_task(a, a.id)
    with c:
        return watch(c, a.id, t["target"])


def task_continue(a: argparse.Namespace) -> int:
    """Release the breakpoint a relocate is held at (an administrator's): the move goes on."""
    c, t = _find_task(a, a.id)
    with c:
        r = c.post(f"/api/cis/tasks/{a.id}", params={"action": "continue"})
    out.print(f"task {a.id} ({t['description']}): released from breakpoint {r['released']}; the move goes on",
              highlight=False)
    return 0


# --- vcenter -----------------------------------------------------------------------------------------
def vc_list(a: argparse.Namespace) -> int:
    rows = deploy.status(a.lab)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table("vCenter", "URL", "SSO domain", "running", "certificate thumbprint (SHA-256)")
    for r in rows:
        table.add_row(r["name"], f"{r['url']} ({r['address']})", r["sso_domain"],
                      f"pid {r['pid']}" if r["running"] else "no", r["thumbprint"])
    out.print(table)
    return 0


def vc_show(a: argparse.Namespace) -> int:
    row = next((r for r in deploy.status(a.lab) if r["name"] == a.name), None)
    if row is None:
        raise NotFound(f"lab {a.lab} has no vCenter {a.name!r}", hint="`testbed vcenter list`")
    if row["running"]:
        with _client(a, a.name) as c:
            row["hosts"] = c.get("/api/vcenter/host")
            row["trusts"] = c.get("/api/testbed/trust")
    print(json.dumps(row, indent=1))
    return 0


def vc_service(action: str) -> Any:
    def run(a: argparse.Namespace) -> int:
        if action in ("stop", "restart"):
            out.print(deploy.stop(a.lab, a.name, kill=a.kill))
        if action in ("start", "restart"):
            pid = deploy.start(a.lab, a.name)
            out.print(f"vCenter {a.name} running (pid {pid}); tasks it left running are being resolved")
        return 0
    return run


def vc_reconcile(a: argparse.Namespace) -> int:
    with _client(a, a.name) as c:
        r = c.post("/api/testbed/reconcile")
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        out.print(f"{a.name}: {len(r['agree'])} VM(s) agree with the hosts: {', '.join(r['agree']) or '-'}")
        for f in r["fixed"]:
            out.print(f"  fixed: {f}")
        for p in r["problems"]:
            out.print(f"  [red]problem:[/] {p}")
        for u in r["unreachable_hosts"]:
            out.print(f"  [yellow]unreachable:[/] {u}")
    return 0 if not r["problems"] and not r["unreachable_hosts"] else 1


def vc_add_host(a: argparse.Namespace) -> int:
    password = a.host_password or os.environ.get("TESTBED_HOST_PASSWORD")
    if password is None:
        raise InputError("give the host's root password (--host-password or $TESTBED_HOST_PASSWORD)")
    with _client(a, a.name) as c:
        r = c.post("/api/vcenter/host", {"hostname": a.hostname, "user_name": a.host_user, "password": password,
                                         "thumbprint": a.thumbprint})
    out.print(f"host {r['name']} ({r['address']}) added to {a.name}: QEMU {r['qemu_version']}, "
              f"SSH key {r['ssh_fingerprint']}, agent pid {r['agent_pid']}")
    return 0


def vc_remove_host(a: argparse.Namespace) -> int:
    with _client(a, a.name) as c:
        c.delete(f"/api/vcenter/host/{a.host}")
    out.print(f"host {a.host} removed from {a.name}")
    return 0


def vc_license(a: argparse.Namespace) -> int:
    with _client(a, a.name) as c:
        r = c.patch(f"/api/vcenter/host/{a.host}", {"license": a.edition})
    out.print(f"host {a.host} in {a.name}: licence {r['license']}")
    return 0


def vc_trust(a: argparse.Namespace) -> int:
    with _client(a, a.name) as c:
        print(json.dumps(c.get("/api/testbed/trust"), indent=1))
    return 0


def add_engine_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--streams", type=lim.arg_streams, default=None, help="multifd channels (XvMotion Streams), 1-16")
    s.add_argument("--converge", choices=lim.CONVERGE_CHOICES, default=None,
                   help="how pre-copy is made to end (see docs/migration.md)")
    s.add_argument("--allow-postcopy", action=argparse.BooleanOptionalAction, default=None,
                   help="adaptive: allow post-copy as the last resort")
    s.add_argument("--completion-timeout", type=lim.arg_completion_timeout, default=None, metavar="SECONDS",
                   help="at most 24 h")
    s.add_argument("--bandwidth", type=lim.arg_bandwidth, help="cap the migration itself, e.g. 100MiB/s")
    s.add_argument("--downtime-limit", type=lim.arg_downtime_limit, default=None,
                   help="QEMU's downtime limit in ms (default 100; 1-60000)")
    add_verdict_options(s)


def add_verdict_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--json", help="write the migration report to this file (when no move ran, e.g. failed "
                                  "prechecks: the task's outcome)")
    s.add_argument("--accept-unverified", action="store_true",
                   help="remove the source copy even when memory or a disk could not be verified (default: "
                        "keep it paused until `testbed vm discard-source VM`). "
                        "Exit code: 0 verified, 2 unverified, 1 failed")


def source_copies(a: argparse.Namespace) -> int:
    rows = []
    for n in ([a.vcenter] if a.vcenter else _vcenters(a.lab)):
        with _client(a, n) as c:
            rows += [{**r, "vcenter": n} for r in c.get("/api/testbed/source-copies")]
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table("VM", "kept by", "on host", "moved to", "task", "why")
    for r in rows:
        table.add_row(r["vm"], r["vcenter"], r["host"], f"{r.get('moved_to')} ({r.get('destination_vcenter')})",
                      r["task"], r.get("why", ""))
    out.print(table if rows else "no source copies kept")
    return 0


def discard_source(a: argparse.Namespace) -> int:
    names = [a.vcenter] if a.vcenter else _vcenters(a.lab)
    for n in names:
        with _client(a, n) as c:
            if any(r["vm"] == a.name for r in c.get("/api/testbed/source-copies")):
                r = c.delete(f"/api/testbed/source-copies/{a.name}")
                out.print(f"source copy of {a.name} on {r['host']} (vCenter {n}) discarded: "
                          f"{', '.join(r['removed']) or 'nothing was left there'}", highlight=False)
                return 0
    raise NotFound(f"no vCenter of lab {a.lab} ({', '.join(names)}) keeps a source copy of VM {a.name!r}",
                   hint="`testbed vm source-copies` lists them")


def register(sub: Any) -> None:
    s = sub.add_parser("relocate", help="move a VM to a host of another vCenter (cross-vCenter vMotion)")
    s.add_argument("vm")
    s.add_argument("--vcenter", help="the VM's vCenter in this lab (default: found by asking each)")
    s.add_argument("--dest-vcenter", required=True, metavar="URL", help="e.g. https://vc-b.tb.test")
    s.add_argument("--dest-user", help="a user of the destination's SSO domain (omit in linked mode)")
    s.add_argument("--dest-password", help="(or $TESTBED_DEST_PASSWORD)")
    s.add_argument("--dest-thumbprint", help="SHA-256 of the destination's certificate (pinned; a mismatch stops "
                                             "the move before anything moves)")
    s.add_argument("--dest-host", required=True)
    s.add_argument("--dest-datastore")
    s.add_argument("--dest-network", help="port group for the VM's NICs at the destination")
    add_engine_options(s)
    s.set_defaults(fn=relocate)

    task = sub.add_parser("task", help="vCenter tasks").add_subparsers(dest="sub", required=True)
    s = task.add_parser("list", help="recent tasks of the lab's vCenters")
    s.add_argument("--vcenter")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=task_list)
    for name, fn, helptext in (("show", task_show, "a task as JSON"),
                               ("watch", task_watch, "follow a task to its end"),
                               ("continue", task_continue, "release the breakpoint a relocate is held at "
                                                           "(administrators)")):
        s = task.add_parser(name, help=helptext)
        s.add_argument("id")
        s.add_argument("--vcenter")
        s.set_defaults(fn=fn)

    vc = sub.add_parser("vcenter", help="the lab's vCenter services").add_subparsers(dest="sub", required=True)
    s = vc.add_parser("list", help="vCenters: URL, SSO domain, certificate thumbprint")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=vc_list)
    s = vc.add_parser("show", help="one vCenter, its hosts and trusts, as JSON")
    s.add_argument("name")
    s.set_defaults(fn=vc_show)
    for action in ("start", "stop", "restart"):
        s = vc.add_parser(action, help=f"{action} a vCenter's service")
        s.add_argument("name")
        if action != "start":
            s.add_argument("--kill", action="store_true", help="SIGKILL (a crash) instead of a clean stop")
        s.set_defaults(fn=vc_service(action), kill=False)
    s = vc.add_parser("reconcile", help="compare the inventory with what the hosts run")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=vc_reconcile)
    s = vc.add_parser("add-host", help="add a host: SSH as root with its password, install the agent")
    s.add_argument("name")
    s.add_argument("hostname")
    s.add_argument("--host-user", default="root")
    s.add_argument("--host-password", help="(or $TESTBED_HOST_PASSWORD)")
    s.add_argument("--thumbprint", help="the host's SSH key fingerprint (SHA256:...), checked if given")
    s.set_defaults(fn=vc_add_host)
    s = vc.add_parser("remove-host", help="remove a host (it must have no VMs)")
    s.add_argument("name")
    s.add_argument("host")
    s.set_defaults(fn=vc_remove_host)
    s = vc.add_parser("host-license", help="assign a licence edition to a host")
    s.add_argument("name")
    s.add_argument("host")
    s.add_argument("edition", help="e.g. enterprise-plus (allows cross-vCenter vMotion), standard")
    s.set_defaults(fn=vc_license)
    s = vc.add_parser("trust", help="the peer vCenters this one trusts")
    s.add_argument("name")
    s.set_defaults(fn=vc_trust)
    img = cli_images.register(sub)
    for p in (vc, task, img):
        for name in p.choices:
            p.choices[name].add_argument("--user", help="vCenter user (default: the domain's administrator)")
            p.choices[name].add_argument("--password", help="(or $TESTBED_VC_PASSWORD)")

