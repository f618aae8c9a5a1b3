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
    token, _ = sso.issue(vc.secret, f"administrator@{vc_config.sso_domain}", vc_config.sso_domain, 600)
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
