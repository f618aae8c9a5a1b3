"""The vCenter's REST API fuzzed from its own OpenAPI schema (schemathesis): every operation, with data that fits
the schema (positive) and data that does not (negative), without a session and with the domain administrator's.
No answer may be a 5xx (but the 503 of the stubs below), every status must be one the schema documents, and
every body the one it documents for that status (testbed.vcenter.views, api.ErrorBody).

The real app (``api.create_app``) on a real ``VCenter`` (``conftest.vc_config``), in-process through Starlette's
test client; no QEMU, no namespaces. Its inventory holds a host (``esx-f1``, its agent a scripted fake: no SSH),
a powered-off VM, a failed task, a trust and a source copy, so the list and detail answers have content to check.
Nothing may leave this process: adding a host (it would resolve and SSH to the name it is given) and reaching a
peer vCenter (the URL a relocate names) are stubbed to fail as an unreachable host does (503), after their input
is validated. A relocate or power-on of a fuzzed name finds no VM; of ``vm1`` it gets as far as the fake agent,
which refuses what it was not scripted for (a 400): no move or guest ever starts.

Bounded and deterministic: EXAMPLES per operation, mode and session, derandomized (the same cases every run), no
example database; the counts are printed (requests, endpoints, server errors).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from testbed.errors import HostUnreachable, NotFound
from testbed.vcenter import sso
from testbed.vcenter.api import create_app
from testbed.vcenter.config import VcenterConfig
from testbed.vcenter.service import VCenter

from .fake_agent import FakeAgent, spec

EXAMPLES = 15
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
STUBBED = "fuzz: this vCenter reaches no host or peer"
HOST_FACTS = {"name": "esx-f1", "hostname": "esx-f1.unit.test", "qemu_version": "10.0.0", "accel": "tcg",
              "datastores": [{"name": "ds-a", "capacity_bytes": 2**34, "free_bytes": 2**33}],
              "port_groups": [{"name": "VM Network"}], "machine_types": ["pc-q35-10.0"]}


def seed(vc: VCenter) -> FakeAgent:
    """A host whose agent is scripted (and kept as the vCenter's open connection: nothing dials out), a VM on it,
    a failed task, a trust and a source copy."""
    now = time.time()
    vc.inv.put_host({"name": "esx-f1", "address": "198.18.250.11", "cluster": vc.cfg.cluster, "state": "connected",
                     "license": "enterprise-plus", "host_key": "", "facts": HOST_FACTS, "added_s": now})
    agent = FakeAgent("esx-f1")
    agent.on("host.facts", HOST_FACTS)
    agent.on("vm.list", [])

    def status(name: str) -> dict[str, Any]:
        raise NotFound(f"fake: no VM {name} on esx-f1")
    agent.on("vm.status", status)
    agent.on("vm.console_log", {"text": "fake console\n"})
    vc._agents["esx-f1"] = agent        # type: ignore[assignment]
    vm = spec().model_copy(update={"name": "vm1"})
    vc.inv.put_vm({"name": "vm1", "host": "esx-f1", "state": "registered", "spec": vm.model_dump(mode="json"),
                   "ip": "198.18.64.2/18", "workload": "idle", "builtin_guest": True, "created_s": now,
                   "history": [{"host": "esx-f1", "vcenter": vc.cfg.name, "since_s": now}]})
    t = vc.new_task("VirtualMachine.relocate", "vm1", "relocate VM vm1 from esx-f1 to esx-f2", "fuzz",
                    source_host="esx-f1", placement={"host": "esx-f2"}, options={}, destination_vcenter=None)
    vc._finish(t, False, error="fuzz: a task that failed")
    vc.inv.put_trust("vc-peer", "https://vc-peer.unit.test", "AB" * 32, vc.cert_pem, how="fuzz")
    vc.inv.put_source_copy({"vm": "vm0", "host": "esx-f1", "task": t["id"], "kept_s": now,
                            "spec": vm.model_copy(update={"name": "vm0"}).model_dump(mode="json"),
                            "moved_to": "esx-f2", "destination_vcenter": "vc-peer", "why": "fuzz"})
    return agent


@pytest.fixture
def app_vc(vc_config: VcenterConfig) -> Iterator[tuple[TestClient, VCenter]]:
    vc = VCenter(vc_config)
    seed(vc)

    async def no_network(*_: Any, **__: Any) -> Any:
        raise HostUnreachable(STUBBED)
    vc.add_host = no_network            # type: ignore[method-assign]
    vc._connect_peer = no_network       # type: ignore[method-assign]
    with TestClient(create_app(vc, recover=False), raise_server_exceptions=False) as c:
        yield c, vc


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for st, n in self.statuses.items() if st >= 500 and st != 503)


def fuzz(c: TestClient, vc: VCenter, op: Any, mode: GenerationMode, authed: bool, tally: Tally) -> None:
    """EXAMPLES cases of ``op`` in ``mode``; a failure is recorded (the first, after hypothesis shrank it)."""
    where = f"{op.method.upper()} {op.path} ({mode.value}, {'session' if authed else 'no session'})"
    admin = f"administrator@{vc.cfg.sso_domain}"

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def one(case: schemathesis.Case) -> None:
        kw = case.as_transport_kwargs(base_url="http://testserver")
        headers = dict(kw.get("headers") or {})
        if authed:   # a fresh token each time: a fuzzed DELETE /api/session logs its own out
            headers["vmware-api-session-id"] = sso.issue(vc.secret, admin, vc.cfg.sso_domain, 600,
                                                         issuer=vc.cfg.name)[0]
        c.cookies.clear()
        r = c.request(kw["method"], kw["url"], params=kw.get("params"), headers=headers, json=kw.get("json"),
                      content=kw.get("data"))
        tally.statuses[r.status_code] += 1
        # a 5xx is a failure, but the 503 of a stubbed host or peer (the answer to an unreachable one)
        assert r.status_code < 500 or (r.status_code == 503 and STUBBED in r.text), \
            f"server error {r.status_code}: {r.text[:500]}"
        case.validate_response(r, checks=CHECKS)

    try:
        one()
    except Unsatisfiable:
        pass            # negative: nothing of the operation can be made invalid
    except (Exception, BaseExceptionGroup) as err:    # schemathesis' FailureGroup is an exception group
        tally.failures.append(f"{where}: {type(err).__name__}: {err}"[:3000])


def test_fuzz_the_api_from_its_schema(app_vc: tuple[TestClient, VCenter], capsys: pytest.CaptureFixture[str]) -> None:
    c, vc = app_vc
    schema = schemathesis.openapi.from_dict(c.get("/api/openapi.json").json())
    tally = Tally()
    ops = []
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        ops.append(f"{op.method.upper()} {op.path}")
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not (len(op.body) or len(op.query)):
                continue   # nothing to make invalid (a path segment is any string; the session header is ours)
            for authed in (False, True):
                fuzz(c, vc, op, mode, authed, tally)
    with capsys.disabled():
        print(f"\nAPI fuzz: {tally.requests} requests to {len(ops)} endpoints, {tally.server_errors} server "
              f"errors, {time.monotonic() - t0:.1f} s; statuses {dict(sorted(tally.statuses.items()))}")
    assert not tally.failures, "\n\n".join(tally.failures)
    assert tally.server_errors == 0
    assert len(ops) >= 30 and tally.requests >= len(ops) * EXAMPLES, "every operation was fuzzed"
    assert {200, 400, 401, 404} <= set(tally.statuses), "the fuzz got past validation and authentication"


def test_the_fuzz_fails_on_a_server_error_and_on_an_answer_the_schema_does_not_document(
        app_vc: tuple[TestClient, VCenter]) -> None:
    c, vc = app_vc
    raw = c.get("/api/openapi.json").json()
    raw["components"]["schemas"]["Datacenter"]["properties"]["name"] = {"type": "integer"}   # not what it answers

    def bug(*_: Any, **__: Any) -> Any:
        raise KeyError("a bug")
    vc.about = bug          # type: ignore[method-assign]
    tally = Tally()
    for result in schemathesis.openapi.from_dict(raw).get_all_operations():
        op = result.ok()
        if op.path in ("/api/vcenter/datacenter", "/api/testbed/about"):
            fuzz(c, vc, op, GenerationMode.POSITIVE, True, tally)
    assert len(tally.failures) == 2, tally.failures
    assert "GET /api/vcenter/datacenter" in tally.failures[0] and "response" in tally.failures[0].lower()
    assert "GET /api/testbed/about" in tally.failures[1] and "server error 500" in tally.failures[1]
