"""The vCenter's REST API refuses bad relocate options with a 400 that names the field, before any work: no
task is created, nothing is touched. The real app (``api.create_app``) on a real ``VCenter`` (``conftest.vc``),
through FastAPI's test client; no lab."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from testbed.vcenter import sso
from testbed.vcenter.api import RelocateOptions, create_app
from testbed.vcenter.config import VcenterConfig
from testbed.vcenter.service import VCenter


@pytest.fixture
def api(vc_config: VcenterConfig) -> Iterator[tuple[TestClient, VCenter]]:
    vc = VCenter(vc_config)
    token, _ = sso.issue(vc.secret, f"administrator@{vc_config.sso_domain}", vc_config.sso_domain, 600,
                         issuer=vc_config.name)
    with TestClient(create_app(vc, recover=False), headers={"vmware-api-session-id": token}) as c:
        yield c, vc


def relocate(c: TestClient, options: dict[str, Any]) -> Any:
    return c.post("/api/vcenter/vm/vm1", params={"action": "relocate"},
                  json={"spec": {"placement": {"host": "esx-b1"}, "options": options}})


@pytest.mark.parametrize(("options", "field", "says"), [
    ({"converge": "bogus"}, "converge", "'sdps'"),
    ({"bandwidth": -1}, "bandwidth", "above zero"),
    ({"bandwidth": 0}, "bandwidth", "above zero"),
    ({"bandwidth": "fast"}, "bandwidth", "bandwidth"),
    ({"streams": 0}, "streams", "greater than or equal to 1"),
    ({"streams": 17}, "streams", "less than or equal to 16"),
    ({"mirror_mode": "async"}, "mirror_mode", "write-blocking"),
    ({"mirror_granularity": 3000}, "mirror_granularity", "power of 2"),
    ({"downtime_limit_ms": 0}, "downtime_limit_ms", "greater than or equal to 1"),
    ({"no_such_option": 1}, "no_such_option", "Extra inputs"),
])
def test_a_bad_option_is_a_400_naming_it_and_starts_nothing(api: tuple[TestClient, VCenter],
                                                            options: dict[str, Any], field: str, says: str) -> None:
    c, vc = api
    r = relocate(c, options)
    assert r.status_code == 400, r.text
    msg = r.json()["messages"][0]["default_message"] if "messages" in r.json() else r.text
    assert f"options.{field}" in msg and says in msg, msg
    assert not vc.inv.tasks(), "refused before a task was created"


def test_good_options_pass_validation_normalized() -> None:
    o = RelocateOptions.model_validate({"converge": "auto", "bandwidth": "30MiB/s", "mirror_granularity": 4096,
                                        "mirror_mode": "background-throttled"})
    assert o.converge == "auto-converge" and o.bandwidth == 30 * 2**20


def test_good_options_reach_the_vm_lookup(api: tuple[TestClient, VCenter]) -> None:
    c, vc = api
    r = relocate(c, {"converge": "sdps", "bandwidth": 10_000_000, "streams": 2})
    assert r.status_code == 404 and "vm1" in r.text, r.text      # valid: the next thing checked is the VM
    assert not vc.inv.tasks()


def create(c: TestClient, **fields: Any) -> Any:
    return c.post("/api/vcenter/vm", json={"name": "vm1", "placement": {"host": "esx-b1"}, **fields})


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"disk": -1}, "disk", "give 1 MiB to 2 TiB"),                 # was a 500 (DiskSpec refused it inside)
    ({"disk": 0}, "disk", "give 1 MiB to 2 TiB"),
    ({"disk": "0"}, "disk", "give 1 MiB to 2 TiB"),                # was a VM without a disk
    ({"disk": "-1G"}, "disk", "cannot read"),
    ({"disk": True}, "disk", "disk"),                              # a JSON true is not 1 byte
    ({"disk": 1.5e9}, "disk", "disk"),
    ({"disk": "9" * 400}, "disk", "at most 32 characters"),
    ({"disk": "999999999999T"}, "disk", "too large"),
    ({"disk": "3T"}, "disk", "give 1 MiB to 2 TiB"),
    ({"memory": "32M"}, "memory", "give 64 MiB to 64 GiB"),
    ({"memory": 2**70}, "memory", "give 64 MiB to 64 GiB"),
    ({"memory": "lots"}, "memory", "cannot read"),
    ({"cpu_count": "2"}, "cpu_count", "valid integer"),            # strict: "2" is not 2
    ({"cpu_count": 17}, "cpu_count", "less than or equal to 16"),
    ({"name": "VM1"}, "name", "lowercase letters"),
    ({"name": "vm1\n"}, "name", "lowercase letters"),
    ({"name": "a" * 40}, "name", "lowercase letters"),
    ({"workload": "memory:fast"}, "workload", "memory dirty rate"),
    ({"placement": {"host": "../etc"}}, "placement.host", "pattern"),
    ({"power_on": "yes"}, "power_on", "valid boolean"),
])
def test_a_bad_vm_create_is_a_400_naming_the_field(api: tuple[TestClient, VCenter], fields: dict[str, Any],
                                                   field: str, says: str) -> None:
    c, vc = api
    r = create(c, **fields)
    assert r.status_code == 400, r.text
    msg = r.json()["messages"][0]["default_message"]
    assert f"{field}:" in msg and says in msg, msg
    assert vc.inv.vm("vm1") is None


@pytest.mark.parametrize("fields", [{}, {"disk": "1G", "memory": "256M"}, {"disk": 2**20, "memory": 64 * 2**20},
                                    {"disk": None, "workload": "memory:20MB/s@64M"}])
def test_a_good_vm_create_reaches_the_host_lookup(api: tuple[TestClient, VCenter], fields: dict[str, Any]) -> None:
    c, _ = api
    r = create(c, **fields)
    assert r.status_code == 404 and "esx-b1" in r.text, r.text    # valid: the next thing checked is the host


@pytest.mark.parametrize(("options", "field"), [
    ({"completion_timeout_s": 0}, "completion_timeout_s"), ({"completion_timeout_s": 1e9}, "completion_timeout_s"),
    ({"downtime_limit_ms": 60_001}, "downtime_limit_ms"), ({"streams": "2"}, "streams"),
    ({"bandwidth": "1000Gbit"}, "bandwidth"), ({"bandwidth": True}, "bandwidth"),
    ({"mirror_granularity": 2**30}, "mirror_granularity"), ({"allow_postcopy": 1}, "allow_postcopy"),
])
def test_relocate_limits_are_checked_at_request_time(api: tuple[TestClient, VCenter], options: dict[str, Any],
                                                     field: str) -> None:
    c, vc = api
    r = relocate(c, options)
    assert r.status_code == 400 and f"options.{field}" in r.text, r.text
    assert not vc.inv.tasks()


def test_a_bad_destination_vcenter_is_refused_before_any_connection(api: tuple[TestClient, VCenter]) -> None:
    c, vc = api
    for dest in ({"url": "http://10.0.0.1"}, {"url": "https://x/../y"}, {"url": "https://vc-b", "thumbprint": "zz"}):
        r = c.post("/api/vcenter/vm/vm1", params={"action": "relocate"},
                   json={"spec": {"placement": {"host": "esx-b1"}, "destination_vcenter": dest}})
        assert r.status_code == 400 and "destination_vcenter" in r.text, r.text
    assert not vc.inv.tasks()


def test_every_error_has_one_shape_and_a_bug_leaks_no_traceback(vc_config: VcenterConfig,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    vc = VCenter(vc_config)
    token, _ = sso.issue(vc.secret, f"administrator@{vc_config.sso_domain}", vc_config.sso_domain, 600,
                         issuer=vc_config.name)

    def broken(*_: Any, **__: Any) -> Any:
        raise KeyError("secret-internal-detail")
    vc.about = broken           # type: ignore[method-assign]
    with TestClient(create_app(vc, recover=False), headers={"vmware-api-session-id": token},
                    raise_server_exceptions=False) as c:
        r = c.get("/api/testbed/about")
        assert r.status_code == 500
        body = r.json()
        assert body["error_type"] == "INTERNAL_ERROR" and "incident" in body["messages"][0]["default_message"]
        assert "secret-internal-detail" not in r.text and "Traceback" not in r.text
        incident = body["messages"][0]["default_message"].rsplit("incident ", 1)[1].rstrip(")")
        assert any(incident in rec.getMessage() and rec.exc_info for rec in caplog.records), "logged with its cause"
        for method, path, status in (("GET", "/api/nowhere", 404), ("PUT", "/api/session", 405),
                                     ("POST", "/api/vcenter/vm", 400)):
            r = c.request(method, path, content=b"{not json")
            assert r.status_code == status and r.json()["error_type"] and r.json()["messages"], r.text
    with TestClient(create_app(vc, recover=False)) as c:
        r = c.get("/api/vcenter/vm")
        assert r.status_code == 401 and r.json()["error_type"] == "UNAUTHENTICATED"
