"""A destination vCenter that cannot be reached when a relocate aborts (the link between the sites is cut) is asked
again in the background until it answers: what it made for the move (placeholder, incoming QEMU, disk) must not
outlive the move. The lab test cuts a real link (tests/lab/test_migration.py, the vMotion link cut in pre-copy)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from testbed.errors import Conflict, HostUnreachable
from testbed.vcenter import relocate
from testbed.vcenter.client import VcClient
from testbed.vcenter.service import VCenter


class Peer:
    """The destination vCenter as the source's clients see it: unreachable ``down`` times, then it answers."""

    def __init__(self, down: int, answer: Any) -> None:
        self.down, self.answer, self.calls, self.closed = down, answer, 0, 0

    def client(self, url: str, thumbprint: str, token: str | None = None, audience: str | None = None) -> Any:
        peer = self

        class Client:
            async def apost(self, path: str, body: Any = None, **kw: Any) -> Any:
                assert path == "/api/testbed/xvmotion/adm-1/abort" and kw["signed"] is True
                assert kw.get("timeout_s", 60) <= relocate.PEER_ABORT_CALL_S, "a try must not wait a minute"
                peer.calls += 1
                if peer.calls <= peer.down:
                    raise HostUnreachable("cannot reach vCenter https://vc-b.test: no route to host")
                if isinstance(peer.answer, Exception):
                    raise peer.answer
                return peer.answer

            def close(self) -> None:
                peer.closed += 1
        return Client()


def task(vc: VCenter) -> dict[str, Any]:
    t = vc.new_task("VirtualMachine.relocate", "vm1", "relocate VM vm1", "administrator@vsphere-t.local",
                    admission="adm-1")
    return t


@pytest.mark.parametrize("answer,said", [({"undone": ["destination QEMU stopped", "disk vm1-disk0 deleted"]},
                                          "removed there: destination QEMU stopped, disk vm1-disk0 deleted"),
                                         (Conflict("VM vm1 is running on esx-b1"), "refused: the guest runs there")])
async def test_an_abort_the_destination_did_not_answer_is_asked_again_until_it_does(
        vc: VCenter, monkeypatch: pytest.MonkeyPatch, answer: Any, said: str) -> None:
    monkeypatch.setattr(relocate, "ABORT_RETRY_FIRST_S", 0.01)
    peer = Peer(down=5, answer=answer)     # 3 tries in the move, then 2 in the background fail
    monkeypatch.setattr(vc, "peer_client", peer.client)
    monkeypatch.setattr(asyncio, "sleep", _fast_sleep(asyncio.sleep))
    t = task(vc)
    moving = VcClient("https://vc-b.test", thumbprint="AA:" * 31 + "AA", audience="vc-b")
    moving.apost = peer.client("", "").apost   # type: ignore[method-assign]
    state, undone = await vc._peer_abort(moving, t)
    assert (state, undone) == ("unknown", [])
    assert "asked again in the background" in t["notes"][-1]
    bg = vc.running[f"abort-{t['admission']}"]
    await asyncio.wait_for(bg, 5)
    assert peer.calls == 6 and peer.closed == 3, (peer.calls, peer.closed)   # each background try closes its client
    assert f"abort-{t['admission']}" not in vc.running
    stored = vc.inv.task(t["id"])
    assert stored is not None and said in stored["notes"][-1], stored["notes"]
    assert [e["kind"] for e in vc.inv.events(vm="vm1")][-1] == "VmMigrationAbortConfirmedEvent"


async def test_an_abort_never_answered_gives_up_at_its_limit_and_says_so(
        vc: VCenter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relocate, "ABORT_RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(relocate, "ABORT_RETRY_S", 0.3)
    peer = Peer(down=10**6, answer=None)
    monkeypatch.setattr(vc, "peer_client", peer.client)
    t = task(vc)
    vc._abort_later(VcClient("https://vc-b.test", thumbprint="AA:" * 31 + "AA", audience="vc-b"), t)
    await asyncio.wait_for(vc.running[f"abort-{t['admission']}"], 5)
    assert peer.calls >= 2
    events = vc.inv.events(vm="vm1")
    assert events[-1]["kind"] == "VmMigrationAbortUnconfirmedEvent", events
    assert "did not answer the abort" in events[-1]["message"] and "reconcile" in events[-1]["message"]


def _fast_sleep(real: Any) -> Any:
    async def sleep(s: float, *a: Any) -> Any:
        return await real(min(s, 0.01), *a)
    return sleep
