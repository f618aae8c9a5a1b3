"""Running a scenario against a lab's vCenters, checking its expectations, and keeping the evidence.

``run_scenario`` builds the lab the scenario describes (or uses one that is up),
creates the VMs through their vCenters, runs the steps, checks every
expectation, removes what it created, and returns the report (``report`` writes
it as JSON and HTML). Every move goes through the vCenter API, as a user's would:
a relocate within a vCenter, or across with the lab's credentials and the
destination's pinned thumbprint. Faults are injected from outside, the way they
happen: the runner watches the move's task and acts when it reaches the phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from testbed import labctl
from testbed.errors import InputError, NotFound, TestbedError
from testbed.lab import builder
from testbed.lab import observer as obs
from testbed.net import fabric
from testbed.scenarios.model import Expect, Move, Scenario
from testbed.units import parse_rate_bytes
from testbed.vcenter import deploy
from testbed.vcenter.client import VcClient

Log = Callable[[str], None]


class Run:
    """One run of a scenario on one lab."""

    def __init__(self, sc: Scenario, lab: str, log: Log) -> None:
        self.sc, self.lab, self.log = sc, lab, log
        self.state = builder.load_state(lab)
        self.topology = self.state.topology
        self.vc_of = {h.name: s.vcenter.name for s in self.topology.sites for h in s.hosts}
        self.clients: dict[str, VcClient] = {}
        self._lock = threading.Lock()
        self.moves: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.where: dict[str, str] = {}       # VM -> host it runs on (as the moves left it)

    # --- plumbing ---------------------------------------------------------------------
    def client(self, vc: str) -> VcClient:
        with self._lock:
            if vc not in self.clients:
                self.clients[vc] = deploy.client(self.lab, vc)
            return self.clients[vc]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()

    def heartbeat(self, vm: str, since: float, until: float | None = None) -> dict[str, Any]:
        req = {"op": "stats", "vm": vm, "since_s": since, "until_s": until, "gap_threshold_ms": 5}
        return asyncio.run(obs.query(builder.LabPaths(self.lab).observer_socket, req))

    def agent_call(self, host: str, method: str, **kw: Any) -> Any:
        """The lab operator's own way to a host (faults, and checking what really runs)."""
        async def go() -> Any:
            async with await labctl.host(self.state, host).agent() as agent:
                return await agent.call(method, **kw)
        return asyncio.run(go())

    def running_on(self, vm: str) -> list[str]:
        out = []
        for h in self.vc_of:
            for d in self.agent_call(h, "vm.list"):
                if d["name"] == vm and d["state"] == "running" and d.get("status") == "running":
                    out.append(h)
        return out

    # --- VMs --------------------------------------------------------------------------------
    def create_vms(self) -> None:
        t0 = time.monotonic()
        for v in self.sc.vms:
            c = self.client(self.vc_of[v.host])
            own = {k: getattr(v, k) for k in ("kernel", "initrd", "append", "image") if getattr(v, k)}  # library items
            c.post("/api/vcenter/vm", {"name": v.name, "placement": {"host": v.host, "network": v.network},
                                       "memory": v.memory, "disk": None if v.image else v.disk,
                                       "workload": v.workload, "encrypted": v.encrypted, **own})
            self.where[v.name] = v.host
        for v in self.sc.vms:
            if not v.builtin_guest:
                continue   # the user's own guest sends no heartbeat
            deadline = time.monotonic() + 120
            while not self.heartbeat(v.name, time.monotonic() - 1)["count"]:
                if time.monotonic() > deadline:
                    raise TestbedError(f"scenario {self.sc.name}: VM {v.name} sent no heartbeat within 120 s",
                                       hint=f"see `testbed --lab {self.lab} vm console-log {v.name}`")
                time.sleep(0.2)
        self.log(f"{len(self.sc.vms)} VM(s) created and sending heartbeats in {time.monotonic() - t0:.1f} s")
        time.sleep(2)   # let the workloads reach their rates before the first move

    def delete_vms(self) -> None:
        for v in self.sc.vms:
            host = self.where.get(v.name, v.host)
            with contextlib.suppress(TestbedError):
                self.client(self.vc_of[host]).delete(f"/api/vcenter/vm/{v.name}")

    # --- moves ----------------------------------------------------------------------------------
    def start_move(self, m: Move) -> tuple[VcClient, str, dict[str, Any]]:
        src = self.where[m.vm]
        svc, dvc = self.vc_of[src], self.vc_of[m.to_host]
        spec: dict[str, Any] = {"placement": {"host": m.to_host, "datastore": m.to_datastore,
                                              "network": m.to_network},
                                "options": m.options.model_dump(exclude_none=True)}
        if dvc != svc:
            cfg = deploy.config_of(self.lab, dvc)
            spec["destination_vcenter"] = deploy.destination_vcenter(cfg)
        c = self.client(svc)
        tid = c.post(f"/api/vcenter/vm/{m.vm}", {"spec": spec}, params={"action": "relocate"})["task"]
        builtin = next(v.builtin_guest for v in self.sc.vms if v.name == m.vm)
        return c, tid, {"vm": m.vm, "builtin_guest": builtin, "from": src, "to": m.to_host, "from_vcenter": svc,
                        "to_vcenter": dvc, "task": tid, "t0_mono": time.monotonic()}

    def finish_move(self, c: VcClient, tid: str, rec: dict[str, Any], expect: Expect) -> dict[str, Any]:
        t = c.wait_task(tid, timeout_s=1800)
        rec["t1_mono"] = time.monotonic()
        rec.update(status=t["status"], verdict=t.get("verdict"), prechecks=t["prechecks"], error=t.get("error"),
                   notes=t.get("notes", []),
                   report=t.get("result"), task_s=round((t["end_time"] or time.time()) - t["start_time"], 2))
        hb = self.heartbeat(rec["vm"], rec["t0_mono"], rec["t1_mono"] + 1)
        rec["heartbeat_gaps"] = [{"at_s": round(g["start_s"] - rec["t0_mono"], 4), "gap_ms": g["gap_ms"]}
                                 for g in hb.get("gaps", [])]
        now = self.running_on(rec["vm"])
        rec["running_on"] = now
        if len(now) == 1:
            self.where[rec["vm"]] = now[0]
        rec["checks"] = check(expect, rec)
        rec["ok"] = all(x["held"] for x in rec["checks"])
        with self._lock:
            self.moves.append(rec)
        r = rec.get("report") or {}
        dt = r.get("downtime_ms", {})
        self.log(f"  {rec['vm']}: {rec['from']} -> {rec['to']}: {t['status']}"
                 + (f", downtime reported {dt.get('reported')} ms, observed {dt.get('observed')} ms" if r else "")
                 + f", {rec['task_s']} s; expectations {'held' if rec['ok'] else 'NOT met'}")
        for x in rec["checks"]:
            if not x["held"]:
                self.log(f"    not met: {x['what']}: {x['detail']}")
        return rec

    def move(self, m: Move) -> dict[str, Any]:
        c, tid, rec = self.start_move(m)
        return self.finish_move(c, tid, rec, m.expect or self.sc.expect)

    # --- steps ------------------------------------------------------------------------------------
    def run_steps(self) -> None:
        for i, st in enumerate(self.sc.steps):
            label = st.label or f"step {i + 1}: {st.kind}"
            self.log(f"[{label}]")
            t0 = time.monotonic()
            n_before = len(self.moves)
            ok, detail = True, ""
            if st.relocate:
                ok = self.move(st.relocate)["ok"]
            elif st.evacuate:
                ok, detail = self.evacuate(st.evacuate)
            elif st.balance:
                ok, detail = self.balance(st.balance)
            elif st.fault:
                ok = self.fault(st.fault)["ok"]
            elif st.link:
                detail = self.link(st.link)
            elif st.wait is not None:
                time.sleep(st.wait)
            elif st.reach:
                ok, detail = self.reach(st.reach)
            elif st.set_license:
                for host, edition in st.set_license.items():
                    self.client(self.vc_of[host]).patch(f"/api/vcenter/host/{host}", {"license": edition})
                detail = ", ".join(f"{h}: {e}" for h, e in st.set_license.items())
            self.steps.append({"label": label, "kind": st.kind, "ok": ok, "detail": detail,
                               "moves": list(range(n_before, len(self.moves))),
                               "duration_s": round(time.monotonic() - t0, 2)})

    def evacuate(self, ev: Any) -> tuple[bool, str]:
        vms = [v for v, h in self.where.items() if h in ev.hosts]
        if not vms:
            return False, f"no VM of the scenario runs on {', '.join(ev.hosts)}"
        plan = [Move(vm=v, to_host=ev.to_hosts[i % len(ev.to_hosts)], options=ev.options, expect=ev.expect)
                for i, v in enumerate(sorted(vms))]
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=ev.concurrency) as pool:
            recs = list(pool.map(self.move, plan))
        took = time.monotonic() - t0
        ok = all(r["ok"] for r in recs)
        detail = f"{len(recs)} VM(s) off {', '.join(ev.hosts)} in {took:.1f} s (concurrency {ev.concurrency})"
        if ev.deadline_s is not None and took > ev.deadline_s:
            ok = False
            detail += f": over the deadline of {ev.deadline_s:.0f} s"
        self.log("  " + detail)
        return ok, detail

    def dirty_rates(self, vms: list[str], window_s: float = 2.0) -> dict[str, float]:
        """Bytes/s each guest dirties, from the page counters in its own heartbeats."""
        def pages(vm: str) -> tuple[float, int]:
            st = self.heartbeat(vm, time.monotonic() - 0.5)
            last = st.get("last") or {}
            return time.monotonic(), int(last.get("mem_pages_written", 0))
        a = {v: pages(v) for v in vms}
        time.sleep(window_s)
        b = {v: pages(v) for v in vms}
        return {v: (b[v][1] - a[v][1]) * 4096 / max(b[v][0] - a[v][0], 1e-3) for v in vms}

    def balance(self, bal: Any) -> tuple[bool, str]:
        vms = [v for v, h in self.where.items() if self.vc_of[h] == bal.from_vcenter]
        rates = self.dirty_rates(vms)
        busiest = sorted(vms, key=lambda v: -rates[v])[:bal.count]
        self.log("  dirty rates: " + ", ".join(f"{v} {rates[v] / 1e6:.1f} MB/s" for v in sorted(vms))
                 + f"; moving {', '.join(busiest)}")
        recs = [self.move(Move(vm=v, to_host=bal.to_hosts[i % len(bal.to_hosts)], options=bal.options,
                               expect=bal.expect)) for i, v in enumerate(busiest)]
        return all(r["ok"] for r in recs), f"moved the busiest: {', '.join(busiest)} " \
            f"({', '.join(f'{rates[v] / 1e6:.1f} MB/s' for v in busiest)})"

    def reach(self, r: Any) -> tuple[bool, str]:
        names = [p.name for p in self.topology.port_groups]
        vc = self.vc_of[self.where[r.vm]]
        ip = str(self.client(vc).get(f"/api/vcenter/vm/{r.vm}")["ip"]).split("/")[0]
        leg = f"eth{names.index(r.network)}"
        p = subprocess.run(["ip", "netns", "exec", fabric.ns_name(self.lab, "obs"), "ping", "-c", "3", "-i", "0.2",
                            "-W", "1", "-I", leg, ip], capture_output=True, text=True)
        answered = p.returncode == 0
        detail = f"ping {r.vm} ({ip}) from port group {r.network!r}: {'answers' if answered else 'no answer'}"
        self.log("  " + detail)
        return answered == r.reachable, detail

    def link(self, ln: Any) -> str:
        parts = []
        if ln.bandwidth is not None:
            bps = None if ln.bandwidth == "off" else parse_rate_bytes(ln.bandwidth, what="link bandwidth")
            labctl.set_link(self.lab, change_bandwidth=True, bandwidth_bps=bps)
            parts.append(f"bandwidth {ln.bandwidth}")
        if ln.cut is not None:
            labctl.set_link(self.lab, up=not ln.cut)
            parts.append("cut" if ln.cut else "restored")
        return ", ".join(parts)

    def fault(self, f: Any) -> dict[str, Any]:
        m: Move = f.move
        expect = m.expect or Expect(result="failed", rolled_back=True)
        undo: list[Callable[[], Any]] = []
        if f.kind == "fill-datastore":
            ds = m.to_datastore or self._first_datastore(m.to_host)
            free = self._free(m.to_host, ds)
            filler = f"filler-{secrets.token_hex(3)}.qcow2"
            size = max(free - 32 * 2**20, 2**20) // 2**20 * 2**20
            self.agent_call(m.to_host, "disk.create", datastore=ds, file=filler, size_bytes=size)
            undo.append(lambda: self.agent_call(m.to_host, "disk.delete", datastore=ds, file=filler))
            self.log(f"  fault: {ds} on {m.to_host} filled ({size // 2**20} MiB filler), before the prechecks")
        try:
            c, tid, rec = self.start_move(m)
            if f.kind != "fill-datastore":
                self._inject_at(c, tid, f.kind, f.at, m, undo)
            rec["fault"] = {"kind": f.kind, "at": f.at}
            return self.finish_move(c, tid, rec, expect)
        finally:
            for u in undo:
                with contextlib.suppress(TestbedError):
                    u()

    def _inject_at(self, c: VcClient, tid: str, kind: str, at: str, m: Move, undo: list[Callable[[], Any]]) -> None:
        deadline = time.monotonic() + 300
        while True:
            t = c.get(f"/api/cis/tasks/{tid}")
            if t["status"] != "RUNNING":
                self.log(f"  fault {kind}: the move ended ({t['status']}) before reaching {at}")
                return
            if t["progress"].get("phase") == at:
                break
            if time.monotonic() > deadline:
                raise TestbedError(f"the move of {m.vm} did not reach {at} within 300 s")
            time.sleep(0.05)
        if kind == "cut-link":
            labctl.set_link(self.lab, up=False)
            undo.append(lambda: labctl.set_link(self.lab, up=True))
            # A partition heals: once the engine gave up on the move (its stall timeout), the link comes
            # back, so the rollback can clean the destination, as it would after a real outage.
            threading.Thread(target=self._heal_when_rolling_back, args=(c, tid), daemon=True).start()
        elif kind == "kill-destination-qemu":
            with contextlib.suppress(NotFound):
                self.agent_call(m.to_host, "vm.kill", name=m.vm)
        elif kind == "kill-source-vcenter":
            vc = self.vc_of[self.where[m.vm]]
            self.log("  " + deploy.stop(self.lab, vc, kill=True))
            deploy.start(self.lab, vc)
            with self._lock:
                self.clients.pop(vc, None)
        self.log(f"  fault: {kind} at {at}")

    def _heal_when_rolling_back(self, c: VcClient, tid: str, outage_s: float = 40.0) -> None:
        """The partition lasts until the move gives up (its stall timeout) or ``outage_s``, whichever is first."""
        deadline = time.monotonic() + outage_s
        while time.monotonic() < deadline:
            t = self._task_quietly(tid)
            if t is None or t["status"] != "RUNNING" or t["progress"].get("phase") in ("rollback", "rolled-back",
                                                                                          "failed"):
                break
            time.sleep(0.2)
        labctl.set_link(self.lab, up=True)
        self.log("  fault: the link is back")

    def _task_quietly(self, tid: str) -> dict[str, Any] | None:
        for vc in {self.vc_of[h] for h in self.vc_of}:
            with contextlib.suppress(TestbedError):
                t: dict[str, Any] = self.client(vc).get(f"/api/cis/tasks/{tid}")
                return t
        return None

    def _first_datastore(self, host: str) -> str:
        return str(self.client(self.vc_of[host]).get("/api/vcenter/datastore", params={"host": host})[0]["name"])

    def _free(self, host: str, ds: str) -> int:
        self.client(self.vc_of[host]).get(f"/api/vcenter/host/{host}")   # refresh the host's facts first
        rows = self.client(self.vc_of[host]).get("/api/vcenter/datastore", params={"host": host})
        return int(next(r["free_space"] for r in rows if r["name"] == ds))


def check(e: Expect, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Each expectation of a move, whether it held, and the number behind it."""
    out: list[dict[str, Any]] = []
    r = rec.get("report") or {}
    ok = rec["status"] == "SUCCEEDED"

    def add(what: str, held: bool, detail: str) -> None:
        out.append({"what": what, "held": bool(held), "detail": detail})
    add(f"result {e.result}", ok == (e.result == "succeeded"),
        f"task {rec['status']}" + (f": {rec['error']['message']}" if rec.get("error") else ""))
    if e.precheck:
        failed = [c["name"] for c in rec.get("prechecks", []) if c["status"] == "error"]
        add(f"precheck {e.precheck} stops it", failed == [e.precheck], f"failed checks: {failed or 'none'}")
    if ok:
        dt = r.get("downtime_ms", {})
        if e.max_downtime_observed_ms is not None:
            obs_ms = dt.get("observed")
            add(f"observed downtime <= {e.max_downtime_observed_ms:g} ms",
                obs_ms is not None and obs_ms <= e.max_downtime_observed_ms, f"{obs_ms} ms")
        if e.max_downtime_reported_ms is not None:
            rep = dt.get("reported")
            add(f"reported downtime <= {e.max_downtime_reported_ms:g} ms",
                rep is not None and rep <= e.max_downtime_reported_ms, f"{rep} ms")
        if e.integrity:
            # the verdict rule (testbed.migration.integrity.verdict): memory and every disk verified; a user's
            # own guest, whose memory nothing can check, is "unverified" and does not pass this expectation
            i = r.get("integrity", {})
            add("integrity verified", rec.get("verdict") == "verified",
                f"verdict {rec.get('verdict')}: memory {i.get('memory')}, disk {i.get('disk')}, "
                f"guest running {i.get('guest_running')}")
        if e.throttled is not None:
            thr = max((x["throttle_pct"] for x in r.get("rounds", [])), default=0)
            stun = any(d.get("action") == "stun" for d in r.get("decisions", []))
            add("the guest was throttled" if e.throttled else "no throttling", (thr > 0 or stun) == e.throttled,
                f"max throttle {thr}%, SDPS stun {'yes' if stun else 'no'}")
    if e.max_total_s is not None:
        add(f"done within {e.max_total_s:g} s", rec["task_s"] <= e.max_total_s, f"{rec['task_s']} s")
    if e.rolled_back:
        add("rolled back: the VM runs on its source only", rec["running_on"] == [rec["from"]],
            f"runs on {rec['running_on']}")
    if ok or e.result == "succeeded":
        want = [rec["to"]] if ok else [rec["from"]]
        add("the VM runs on exactly one host", rec["running_on"] == want, f"runs on {rec['running_on']}")
    return out


def summarize(moves: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(xs: list[float]) -> dict[str, float] | None:
        xs = sorted(x for x in xs if x is not None)
        if not xs:
            return None
        def pct(p: float) -> float:
            return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]
        return {"n": len(xs), "min": xs[0], "p50": pct(0.5), "p95": pct(0.95), "max": xs[-1]}
    done = [m for m in moves if m.get("report") and m["status"] == "SUCCEEDED"]
    return {
        "moves": len(moves), "succeeded": len(done),
        "downtime_observed_ms": stats([m["report"]["downtime_ms"]["observed"] for m in done]),
        "downtime_reported_ms": stats([m["report"]["downtime_ms"]["reported"] for m in done]),
        "engine_total_s": stats([m["report"]["total_s"] for m in done]),
        "task_s": stats([m["task_s"] for m in moves]),
    }


@contextlib.contextmanager
def lab_for(sc: Scenario, lab: str | None, log: Log) -> Iterator[str]:
    """The lab a scenario runs on: the one named if it is up, else a new one removed afterwards."""
    if lab is not None:
        try:
            st = builder.load_state(lab)
        except NotFound:
            st = None
        if st is not None:
            have = {h.name for *_, h in st.topology.hosts()}
            need = {v.host for v in sc.vms} | {m for s in sc.steps for m in _hosts_of(s)}
            if not need <= have:
                raise InputError(f"lab {lab} lacks host(s) {', '.join(sorted(need - have))} that scenario "
                                 f"{sc.name} uses", hint="run it without --lab (it builds its own) or on a lab "
                                                         "built from its topology")
            log(f"using lab {lab}, which is up")
            yield lab
            return
    name = lab or "s" + secrets.token_hex(3)
    t0 = time.monotonic()
    asyncio.run(deploy.up(sc.lab_topology(name)))
    log(f"lab {name} built for scenario {sc.name} in {time.monotonic() - t0:.1f} s")
    try:
        yield name
    finally:
        labctl.down(name)
        log(f"lab {name} removed")


def _hosts_of(step: Any) -> list[str]:
    out: list[str] = []
    if step.relocate:
        out.append(step.relocate.to_host)
    if step.fault:
        out.append(step.fault.move.to_host)
    if step.evacuate:
        out += [*step.evacuate.hosts, *step.evacuate.to_hosts]
    if step.balance:
        out += list(step.balance.to_hosts)
    return out


def run_scenario(sc: Scenario, *, lab: str | None = None, repeat: int = 1, log: Log = print) -> dict[str, Any]:
    started = time.time()
    runs: list[dict[str, Any]] = []
    with lab_for(sc, lab, log) as name:
        link0 = builder.load_state(name).link_bandwidth_bps
        for k in range(repeat):
            if repeat > 1:
                log(f"--- repeat {k + 1} of {repeat}")
            run = Run(sc, name, log)
            error = None
            try:
                run.create_vms()
                run.run_steps()
            except TestbedError as err:
                error = str(err)
                log(f"scenario {sc.name} stopped: {err}")
            finally:
                with contextlib.suppress(TestbedError):
                    labctl.set_link(name, up=True)
                    labctl.set_link(name, change_bandwidth=True, bandwidth_bps=link0)
                run.delete_vms()
                run.close()
            runs.append({"steps": run.steps, "moves": run.moves, "error": error,
                         "ok": error is None and all(s["ok"] for s in run.steps)})
    all_moves = [m for r in runs for m in r["moves"]]
    return {"scenario": sc.model_dump(mode="json"), "name": sc.name, "lab": name, "started": started,
            "duration_s": round(time.time() - started, 1), "repeat": repeat, "runs": runs,
            "summary": summarize(all_moves), "passed": all(r["ok"] for r in runs)}
