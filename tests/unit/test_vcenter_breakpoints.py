"""Breakpoints: an administrator's relocate held at a named engine checkpoint through the vCenter (fault injection
with no callback crossing into the vCenter's process), released by ``continue`` or by its time limit; and the
engine options the relocate API now takes reach the engine.

A real ``VCenter`` on a temporary directory (``conftest.vc_config``) with two hosts in its inventory, whose agents
are scripted (``fake_agent.scripted_pair``: they carry the VM through a successful move). The vCenter reaches them
where it dials any host (``ManagedHost.agent``); nothing else of it is replaced. No lab, no root, no QEMU.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient

from testbed import cli_vcenter
from testbed.cli import main
from testbed.errors import ApiError, Conflict, Forbidden, NotFound
from testbed.migration.engine import Migration
from testbed.migration.request import MigrationRequest
from testbed.vcenter import hostconn, relocate, sso
from testbed.vcenter.api import create_app
from testbed.vcenter.client import VcClient
from testbed.vcenter.config import VcenterConfig
from testbed.vcenter.limits import CHECKPOINTS
from testbed.vcenter.service import VCenter
from tests.unit.fake_agent import FakeAgent, FakeHost, MiB, not_there, scripted_pair, spec
from tests.unit.vckit import agents, interrupted_task, restart

ADMIN = "administrator@vsphere-t.local"
READER = "reader@vsphere-t.local"
VM = spec()
INCOMING = {"uri": "tcp:198.18.2.11:8000", "nbd": {"host": "198.18.2.11", "port": 10809}}   # scripted_pair's


def facts(name: str, datastore: str) -> dict[str, Any]:
    return {"name": name, "hostname": "localhost", "qemu_version": "9.2", "accel": "tcg", "vms": [],
            "datastores": [{"name": datastore, "capacity_bytes": 2**40, "free_bytes": 2**40}],
            "port_groups": [{"name": "VM Network"}], "machine_types": [VM.machine]}


def lab(vc: VCenter, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeAgent, FakeAgent]:
    """esx-a1 (running vm1, a guest without the built-in agent) and esx-b1 in ``vc``'s inventory, an administrator
    and a read-only user; the hosts' agents scripted, reached where the vCenter dials a host."""
    src, dst = scripted_pair(VM)
    src.on("host.facts", facts("esx-a1", "ds-a"))
    src.on("disk.info", {"encrypted": False})
    src.on("net.probe_connect", lambda address, ports, connect_timeout_s: [
        {"port": p, "ok": True, "connect_ms": 0.3} for p in ports])
    src.on("migration.release_switchover", None)
    dst.on("net.probe_listen", {"address": "198.18.1.12", "ports": [47001, 47002]})
    now = time.time()
    for name, address, ds in (("esx-a1", "198.18.1.11", "ds-a"), ("esx-b1", "198.18.1.12", "ds-b")):
        vc.inv.put_host({"name": name, "address": address, "cluster": vc.cfg.cluster, "state": "connected",
                         "license": "enterprise-plus", "host_key": "", "facts": facts(name, ds), "added_s": now})
    vc.inv.put_vm({"name": "vm1", "host": "esx-a1", "state": "registered", "spec": VM.model_dump(mode="json"),
                   "ip": "198.18.64.2/18", "workload": "idle", "builtin_guest": False, "created_s": now,
                   "history": []})
    vc.inv.put_user(ADMIN, sso.hash_password("pw"), "Admin")
    vc.inv.put_user(READER, sso.hash_password("pw"), "ReadOnly")
    fakes = {"esx-a1": src, "esx-b1": dst}

    async def agent(host: hostconn.ManagedHost) -> FakeAgent:
        return fakes[host.name]
    monkeypatch.setattr(hostconn.ManagedHost, "agent", agent)
    return src, dst


def gated_precopy(src: FakeAgent, dst: FakeAgent) -> asyncio.Event:
    """The scripted QEMU reports a pre-copy round and goes on copying (a guest still dirtying memory) until the
    event returned is set; then it pauses at pre-switchover and the agents switch over, one event at a time.

    (Not scripted_pair's QEMU, which reaches its switchover within milliseconds: during a hold its source's and
    destination's events pile up, and the engine, which takes whichever side's event comes first and leaves the
    phases' other events unread, can then miss the destination's resume, a fault of the engine's, not of the
    breakpoint.)"""
    go = asyncio.Event()
    jobs: list[asyncio.Task[None]] = []

    def start(**params: Any) -> None:
        async def run() -> None:
            t = time.monotonic()
            for n, remaining in ((1, 32 * MiB), (2, 16 * MiB)):
                src.emit("migration-progress", {
                    "status": "active", "dirty_sync_count": n, "transferred_bytes": n * 32 * MiB,
                    "remaining_bytes": remaining, "dirty_rate_pps": 100, "throttle_pct": 0, "mbps": 200.0,
                    "t_s": t + 0.1 * n})
            await go.wait()
            paused = time.monotonic()
            src.emit_qmp("MIGRATION", {"status": "pre-switchover"})
            await asyncio.sleep(0.01)
            src.emit("migration-switchover", {"mirror_done_s": paused + 0.001, "continued_s": paused + 0.002})
            await asyncio.sleep(0.01)
            dst.emit("migration-resumed", {"completed_s": paused + 0.02, "cont_s": paused + 0.03,
                                           "resumed_s": paused + 0.04})
        jobs.append(asyncio.get_running_loop().create_task(run()))
    src.on("migration.start", start)
    return go


async def until(what: str, cond: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (got := cond()):
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        await asyncio.sleep(0.01)
    return got


def start(vc: VCenter, **options: Any) -> tuple[str, asyncio.Task[None]]:
    t = vc.start_relocate("vm1", {"host": "esx-b1"}, None, {"accept_unverified": True, **options}, ADMIN)
    return t["id"], vc.running[t["id"]]


def view(vc: VCenter, tid: str) -> dict[str, Any]:
    return vc.task_view(vc.task(tid))


async def test_a_relocate_holds_at_its_breakpoint_until_continued(vc: VCenter,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = lab(vc, monkeypatch)
    go = gated_precopy(src, dst)
    rounds: list[int] = []       # the pre-copy rounds the engine has read from the source, as it reports them
    progress_of = vc._engine_progress

    def recorded(t: dict[str, Any]) -> Callable[[Any], None]:
        on = progress_of(t)
        return lambda p: (rounds.append(p.round), on(p))[-1]
    monkeypatch.setattr(vc, "_engine_progress", recorded)
    tid, job = start(vc, breakpoints=["memory-precopy:started"])
    held = await until("the task is held", lambda: view(vc, tid)["held_at"])
    assert held["checkpoint"] == "memory-precopy:started" and held["incoming"] == INCOMING
    assert abs(held["since"] - time.time()) < 10
    calls = (src.methods(), dst.methods())
    await asyncio.sleep(0.3)   # the source reported a pre-copy round at once: a free engine would have read it
    assert (src.methods(), dst.methods()) == calls, "the engine went past its breakpoint"
    assert "migration.start" in calls[0] and "vm.downtime_trace" not in calls[0] + calls[1]
    v = view(vc, tid)
    assert v["status"] == "RUNNING" and v["progress"]["phase"] == "memory-precopy"
    assert not any(rounds), "the source's rounds were not read while held"
    assert vc.continue_task(tid, ADMIN) == {"released": "memory-precopy:started"}
    await until("the engine reads the source's rounds", lambda: any(rounds))
    go.set()
    await asyncio.wait_for(job, 10)
    v = view(vc, tid)
    assert v["status"] == "SUCCEEDED", v["error"]
    assert v["held_at"] is None and [h["checkpoint"] for h in v["holds"]] == ["memory-precopy:started"]
    assert v["holds"][0]["released_by"] == ADMIN and v["holds"][0]["held_s"] >= 0.3
    assert any(n.startswith("held at breakpoint memory-precopy:started for") for n in v["notes"]), v["notes"]
    assert vc.inv.vm("vm1")["host"] == "esx-b1", "the move completed"
    assert {"TaskHeldEvent", "TaskReleasedEvent"} <= {e["kind"] for e in vc.inv.events()}
    with pytest.raises(Conflict, match="already ended SUCCEEDED") as e:
        vc.continue_task(tid, ADMIN)
    assert e.value.hint and f"testbed task show {tid}" in e.value.hint


async def test_a_breakpoint_never_released_ends_by_its_time_limit(vc: VCenter, monkeypatch: pytest.MonkeyPatch) -> None:
    lab(vc, monkeypatch)
    tid, job = start(vc, breakpoints=["disk-sync:mirror-started"], breakpoint_timeout_s=0.3)
    assert (await until("the task is held", lambda: view(vc, tid)["held_at"]))["incoming"] == INCOMING
    await asyncio.wait_for(job, 10)
    v = view(vc, tid)
    assert v["status"] == "SUCCEEDED", v["error"]
    assert v["holds"][0]["released_by"] == "its time limit" and v["holds"][0]["held_s"] >= 0.3
    assert any(re.fullmatch(r"breakpoint disk-sync:mirror-started released by its time limit after 0\.\d s", n)
               for n in v["notes"]), v["notes"]


async def test_each_checkpoint_holds_once_and_incoming_is_empty_before_it_exists(
        vc: VCenter, monkeypatch: pytest.MonkeyPatch) -> None:
    lab(vc, monkeypatch)
    tid, job = start(vc, breakpoints=["precheck", "verify"], breakpoint_timeout_s=5)
    first = await until("held at precheck", lambda: view(vc, tid)["held_at"])
    assert first["checkpoint"] == "precheck" and first["incoming"] == {}, "no destination QEMU yet"
    assert vc.continue_task(tid, ADMIN) == {"released": "precheck"}
    with pytest.raises(Conflict, match="not held at a breakpoint") as e:   # released, not yet at verify
        vc.continue_task(tid, ADMIN)
    assert e.value.hint and "precheck, verify" in e.value.hint
    second = await until("held at verify", lambda: (view(vc, tid)["held_at"] or {}).get("checkpoint") == "verify")
    assert second
    assert vc.continue_task(tid, ADMIN) == {"released": "verify"}
    await asyncio.wait_for(job, 10)
    assert [h["checkpoint"] for h in view(vc, tid)["holds"]] == ["precheck", "verify"]


async def test_switchover_held_asks_the_source_to_wait_and_releases_it_after_continue(
        vc: VCenter, monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = lab(vc, monkeypatch)
    tid, job = start(vc, breakpoints=["switchover:held"])
    held = await until("held at the switchover", lambda: view(vc, tid)["held_at"])
    assert held["checkpoint"] == "switchover:held" and held["incoming"] == INCOMING
    assert src.called("migration.start")[0]["hold_switchover"] is True, "the source waits at pre-switchover"
    assert view(vc, tid)["progress"]["phase"] == "switchover"
    assert not src.called("migration.release_switchover"), "not released while held"
    vc.continue_task(tid, ADMIN)
    await asyncio.wait_for(job, 10)
    assert src.called("migration.release_switchover") == [{"name": "vm1"}]
    assert view(vc, tid)["status"] == "SUCCEEDED"


async def test_without_breakpoints_nothing_holds(vc: VCenter, monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = lab(vc, monkeypatch)
    tid, job = start(vc)
    await asyncio.wait_for(job, 10)
    v = view(vc, tid)
    assert v["status"] == "SUCCEEDED" and v["holds"] == [] and v["held_at"] is None
    assert src.called("migration.start")[0]["hold_switchover"] is False
    assert "breakpoint_timeout_s" not in vc.task(tid)["options"]
    with pytest.raises(Conflict, match="already ended"):
        vc.continue_task(tid, ADMIN)
    with pytest.raises(NotFound, match="task-nope"):
        vc.continue_task("task-nope", ADMIN)


async def test_a_held_at_left_by_a_restart_is_not_shown_and_recovery_clears_it(vc: VCenter) -> None:
    agents(vc, "failed")[1].on("vm.status", not_there)     # stopped before the switchover: rolled back
    t = interrupted_task(vc)
    t["held_at"] = {"checkpoint": "memory-precopy:started", "since": time.time() - 5, "incoming": INCOMING}
    vc.inv.put_task(t)
    assert view(vc, t["id"])["held_at"] is None, "nothing holds it in this process"
    with pytest.raises(Conflict, match="not held at a breakpoint"):
        vc.continue_task(t["id"], ADMIN)
    t = await restart(vc)
    assert "held_at" not in t and t["state"] == "FAILED"
    assert any("held at breakpoint memory-precopy:started when vCenter vc-t stopped" in n for n in t["notes"])


def test_the_api_takes_only_the_engines_checkpoints() -> None:
    src = "\n".join(p.read_text() for p in Path(relocate.__file__).parents[1].joinpath("migration").glob("*.py"))
    reached = set(re.findall(r'_checkpoint\("([^"]+)"\)', src))
    assert reached == set(CHECKPOINTS), "testbed.vcenter.limits.Checkpoint names the engine's checkpoints"


async def test_a_held_move_keeps_its_ticket(vc: VCenter) -> None:
    """A cross-vCenter move's ticket lasts its time limit: every breakpoint's longest hold, a longer disk copy or
    post-copy recovery, add to it."""
    base = vc._move_time_limit(VM, {})
    assert vc._move_time_limit(VM, {"breakpoints": ["precheck", "verify"], "breakpoint_timeout_s": 100}) == base + 200
    assert vc._move_time_limit(VM, {"breakpoints": ["verify"]}) == base + 300, "the default hold"
    assert vc._move_time_limit(VM, {"disk_sync_timeout_s": 5000}) > base + 4000
    pc = vc._move_time_limit(VM, {"allow_postcopy": True})
    assert vc._move_time_limit(VM, {"allow_postcopy": True, "postcopy_recovery_timeout_s": 1120}) == pc + 1000


# --- through the REST API ------------------------------------------------------------------------------------
@dataclass
class Api:
    c: TestClient
    vc: VCenter
    src: FakeAgent
    dst: FakeAgent

    def as_user(self, user: str) -> dict[str, str]:
        token, _ = sso.issue(self.vc.secret, user, self.vc.cfg.sso_domain, 600, issuer=self.vc.cfg.name)
        return {"vmware-api-session-id": token}

    def relocate(self, options: dict[str, Any], user: str = ADMIN) -> Any:
        return self.c.post("/api/vcenter/vm/vm1", params={"action": "relocate"}, headers=self.as_user(user),
                           json={"spec": {"placement": {"host": "esx-b1"}, "options": options}})

    def cont(self, tid: str, user: str = ADMIN) -> Any:
        return self.c.post(f"/api/cis/tasks/{tid}", params={"action": "continue"}, headers=self.as_user(user))

    def task(self, tid: str) -> dict[str, Any]:
        r = self.c.get(f"/api/cis/tasks/{tid}", headers=self.as_user(ADMIN))
        assert r.status_code == 200, r.text
        return dict(r.json())

    def until(self, what: str, cond: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (got := cond()):
            assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
            time.sleep(0.02)
        return got


@pytest.fixture
def api(vc_config: VcenterConfig, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    vc = VCenter(vc_config)
    src, dst = lab(vc, monkeypatch)
    with TestClient(create_app(vc, recover=False)) as c:
        yield Api(c, vc, src, dst)


def message(r: Any) -> str:
    return str(r.json()["messages"][0]["default_message"])


def test_held_and_continued_through_the_api(api: Api) -> None:
    r = api.relocate({"accept_unverified": True, "breakpoints": ["disk-sync:mirror-started"]})
    assert r.status_code == 202, r.text
    tid = r.json()["task"]
    held = api.until("the task is held", lambda: api.task(tid)["held_at"])
    assert held["checkpoint"] == "disk-sync:mirror-started" and held["incoming"] == INCOMING
    assert api.task(tid)["status"] == "RUNNING"
    r = api.cont(tid, READER)
    assert r.status_code == 403 and f"user {READER} may not release" in message(r), r.text
    assert api.task(tid)["held_at"], "a refused continue releases nothing"
    r = api.cont(tid)
    assert r.status_code == 200 and r.json() == {"released": "disk-sync:mirror-started"}, r.text
    done = api.until("the task ends", lambda: (t := api.task(tid))["status"] != "RUNNING" and t)
    assert done["status"] == "SUCCEEDED" and done["held_at"] is None, done["error"]
    r = api.cont(tid)
    assert r.status_code == 409 and "not held at a breakpoint" in message(r) and r.json()["hint"], r.text
    r = api.cont("task-0123456789")
    assert r.status_code == 404 and "task-0123456789" in message(r), r.text
    r = api.c.post(f"/api/cis/tasks/{tid}", params={"action": "pause"}, headers=api.as_user(ADMIN))
    assert r.status_code == 400 and "action" in message(r), r.text


def test_only_an_administrator_sets_breakpoints(api: Api) -> None:
    r = api.relocate({"breakpoints": ["verify"]}, READER)
    assert r.status_code == 403, r.text
    assert f"user {READER} may not hold a relocate at engine breakpoints" in message(r) and r.json()["hint"]
    assert not api.vc.inv.tasks(), "refused before a task was made"
    assert not api.src.calls and not api.dst.calls, "nothing touched"
    r = api.relocate({"breakpoints": [], "accept_unverified": True}, READER)   # none named: any user's relocate
    assert r.status_code == 202, r.text
    tid = r.json()["task"]
    assert api.until("the task ends", lambda: api.task(tid)["status"] == "SUCCEEDED")


@pytest.mark.parametrize(("options", "field", "says"), [
    ({"stall_timeout_s": 0}, "stall_timeout_s", "greater than 0"),
    ({"stall_timeout_s": -5}, "stall_timeout_s", "greater than 0"),
    ({"stall_timeout_s": 601}, "stall_timeout_s", "less than or equal to 600"),
    ({"stall_timeout_s": "20"}, "stall_timeout_s", "valid number"),
    ({"postcopy_recovery_timeout_s": 0}, "postcopy_recovery_timeout_s", "greater than 0"),
    ({"postcopy_recovery_timeout_s": 3601}, "postcopy_recovery_timeout_s", "less than or equal to 3600"),
    ({"disk_sync_timeout_s": 0}, "disk_sync_timeout_s", "greater than 0"),
    ({"disk_sync_timeout_s": 86401}, "disk_sync_timeout_s", "less than or equal to 86400"),
    ({"sdps_max_stun_pct": 0}, "sdps_max_stun_pct", "greater than or equal to 1"),
    ({"sdps_max_stun_pct": 100}, "sdps_max_stun_pct", "less than or equal to 99"),
    ({"sdps_max_stun_pct": 50.5}, "sdps_max_stun_pct", "valid integer"),
    ({"sdps_max_stun_pct": "50"}, "sdps_max_stun_pct", "valid integer"),
    ({"breakpoints": ["nowhere"]}, "breakpoints.0", "'memory-precopy:started'"),
    ({"breakpoints": "verify"}, "breakpoints", "valid list"),
    ({"breakpoints": ["verify", "precheck", "verify"]}, "breakpoints", "verify given more than once"),
    ({"breakpoints": ["verify"] * 9}, "breakpoints", "at most 8 items"),
    ({"breakpoints": ["verify"], "breakpoint_timeout_s": 0}, "breakpoint_timeout_s", "greater than 0"),
    ({"breakpoints": ["verify"], "breakpoint_timeout_s": 901}, "breakpoint_timeout_s", "less than or equal to 900"),
])
def test_a_bad_new_option_is_a_400_naming_it_and_starts_nothing(api: Api, options: dict[str, Any], field: str,
                                                                 says: str) -> None:
    for user in (ADMIN, READER):      # checked before who may do it
        r = api.relocate(options, user)
        assert r.status_code == 400, r.text
        assert f"options.{field}:" in message(r) and says in message(r), message(r)
    assert not api.vc.inv.tasks(), "refused before a task was made"


def test_the_new_options_reach_the_engine(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[MigrationRequest] = []

    class Recorded(Migration):
        def __init__(self, req: MigrationRequest, **kw: Any) -> None:
            asked.append(req)
            super().__init__(req, **kw)
    monkeypatch.setattr(relocate, "Migration", Recorded)
    r = api.relocate({"accept_unverified": True, "stall_timeout_s": 30, "postcopy_recovery_timeout_s": 600.5,
                      "disk_sync_timeout_s": 900, "sdps_max_stun_pct": 40, "breakpoints": ["switchover:held"],
                      "breakpoint_timeout_s": 0.2})
    assert r.status_code == 202, r.text
    tid = r.json()["task"]
    done = api.until("the task ends", lambda: (t := api.task(tid))["status"] != "RUNNING" and t)
    assert done["status"] == "SUCCEEDED", done["error"]
    (req,) = asked
    assert (req.stall_timeout_s, req.postcopy_recovery_timeout_s, req.disk_sync_timeout_s) == (30, 600.5, 900)
    assert req.convergence.sdps_max_stun_pct == 40 and req.hold_switchover
    assert api.vc.task(tid)["options"]["breakpoint_timeout_s"] == 0.2


def test_a_plain_relocate_asks_the_engine_for_its_defaults(vc: VCenter) -> None:
    v = {"name": "vm1", "builtin_guest": False, "workload": "idle"}
    req = vc._request(v, VM, FakeHost("esx-a1"), FakeHost("esx-b1"), "vc-t", "ds-b", {"breakpoints": ["verify"]})
    d = MigrationRequest(spec=VM, source=req.source, destination=req.destination, observer_socket=Path("/x"))
    assert (req.stall_timeout_s, req.postcopy_recovery_timeout_s, req.disk_sync_timeout_s, req.convergence,
            req.hold_switchover) == (d.stall_timeout_s, d.postcopy_recovery_timeout_s, d.disk_sync_timeout_s,
                                     d.convergence, False)


# --- the client and the command line ---------------------------------------------------------------------------
def answer(status: int, body: dict[str, Any]) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r._content = json.dumps(body).encode()
    return r


@pytest.mark.parametrize(("status", "raised"), [(403, Forbidden), (404, NotFound), (409, Conflict)])
def test_the_client_raises_by_status(status: int, raised: type[Exception]) -> None:
    c = VcClient("https://vc-t.unit.test", thumbprint="AB:" * 31 + "AB")
    body = {"error_type": "X", "messages": [{"default_message": "no", "args": [], "id": "x"}], "hint": "h"}
    with pytest.raises(raised) as e:
        c._answer(answer(status, body), "POST", "/api/cis/tasks/t1?action=continue")
    if status == 403:      # still an ApiError with its status, as callers that read the status expect
        assert isinstance(e.value, ApiError) and e.value.status == 403 and e.value.hint == "h"
    c.close()


class FakeVc:
    """What ``testbed task continue`` asks of a vCenter's client."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.posted: list[tuple[str, Any]] = []

    def get(self, path: str) -> dict[str, Any]:
        return {"id": "task-1", "description": "relocate VM vm1 from esx-a1 to esx-b1", "target": "vm1"}

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        self.posted.append((path, kw.get("params")))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def close(self) -> None:
        pass

    def __enter__(self) -> FakeVc:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_task_continue_on_the_command_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ok = FakeVc({"released": "verify"})
    monkeypatch.setattr(cli_vcenter, "_client", lambda a, name: ok)
    assert main(["task", "continue", "task-1", "--vcenter", "vc-t"]) == 0
    assert ok.posted == [("/api/cis/tasks/task-1", {"action": "continue"})]
    said = " ".join(capsys.readouterr().out.split())       # rich wraps at the terminal's width
    assert "task task-1 (relocate VM vm1 from esx-a1 to esx-b1): released from breakpoint verify; the move goes " \
           "on" in said, said
    refused = FakeVc(Conflict("task task-1 is running, in disk-sync, not held at a breakpoint", hint="wait"))
    monkeypatch.setattr(cli_vcenter, "_client", lambda a, name: refused)
    assert main(["task", "continue", "task-1", "--vcenter", "vc-t"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "not held at a breakpoint" in err and "wait" in err
