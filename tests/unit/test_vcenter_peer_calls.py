"""Signed calls between vCenters and sessions in linked mode, attacked: a replayed call, a call signed for another
vCenter, the old format without a nonce, tampered bodies and queries, the nonce memory over time; a session logged
out at one vCenter of a domain and used at another, with the issuer reachable and not.

Three real vCenters (vc-a, vc-b, vc-c, one SSO domain; vc-b and vc-c trust vc-a, vc-a trusts both), each its real
app (``api.create_app``) under FastAPI's test client, in process, no lab. A vCenter reaches its peers with its
real ``VcClient`` (the real signing, the real error handling) whose HTTP session is the peer's test client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient

from testbed.errors import Forbidden
from testbed.vcenter import certs, peercall, sso
from testbed.vcenter.api import create_app
from testbed.vcenter.client import VcClient
from testbed.vcenter.config import VcenterConfig
from testbed.vcenter.service import VCenter

DOMAIN = "vsphere-l.local"
ADMIN = f"administrator@{DOMAIN}"
PASSWORD = "pw-unit-linked"
ADMISSION = "/api/testbed/xvmotion/adm-1"      # a peer-only route: vc-a's admission at vc-b or vc-c


class _Answer:
    """What ``VcClient.request`` reads of a ``requests.Response``, from the test client's."""

    def __init__(self, r: Any) -> None:
        self.status_code, self.content, self.text, self.reason = r.status_code, r.content, r.text, r.reason_phrase
        self._r = r

    def json(self) -> Any:
        return self._r.json()


class _InProcess:
    """``requests.Session``'s face over the test clients of the lab's vCenters: a call to a vCenter that is
    ``down`` fails the way a refused connection does. Records the headers of each call it carries."""

    def __init__(self, net: Net) -> None:
        self.net = net

    def request(self, method: str, url: str, *, data: bytes | None = None, params: Any = None,
                headers: dict[str, str] | None = None, auth: Any = None, timeout: Any = None) -> _Answer:
        base, _, rest = url.removeprefix("https://").partition("/")
        name = base.split(".")[0]
        if name in self.net.down:
            raise requests.exceptions.ConnectionError(f"Failed to establish a new connection: {base} is down')")
        self.net.sent.append((name, method, "/" + rest, dict(headers or {})))
        r = self.net.clients[name].request(method, "/" + rest, content=data, params=params, headers=headers,
                                           auth=auth)
        return _Answer(r)

    def close(self) -> None:
        pass


@dataclass
class Net:
    vcs: dict[str, VCenter]
    clients: dict[str, TestClient]
    down: set[str]
    sent: list[tuple[str, str, str, dict[str, str]]]

    def peer(self, frm: str, to: str, **kw: Any) -> VcClient:
        """vCenter ``frm``'s client of vCenter ``to``, as its own code makes it (``Trust.peer_client``)."""
        v = self.vcs[to]
        return self.vcs[frm].peer_client(v.cfg.url, v.thumbprint, **kw)

    def events(self, name: str, kind: str = "PeerCallRefusedEvent") -> list[dict[str, Any]]:
        return [e for e in self.vcs[name].inv.events() if e["kind"] == kind]


def _config(tmp: Path, name: str, index: int) -> VcenterConfig:
    d = tmp / name
    d.mkdir()
    cfg = VcenterConfig(name=name, fqdn=f"{name}.unit.test", address=f"198.18.250.{index}", dir=str(d),
                        sso_domain=DOMAIN, lab="unit-no-lab", reconcile_every_s=0)
    certs.make_self_signed(cfg.cert, cfg.key, cfg.fqdn, [cfg.fqdn], cfg.address)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(cfg.ssh_key)], check=True)
    cfg.domain_secret.write_bytes(b"L" * 32)          # one domain: the same secret (linked mode)
    return cfg


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    vcs = {n: VCenter(_config(tmp_path, n, i + 1)) for i, n in enumerate(("vc-a", "vc-b", "vc-c"))}
    pw = sso.hash_password(PASSWORD)
    for v in vcs.values():
        v.inv.put_user(ADMIN, pw, "Admin")
    a = vcs["vc-a"]
    for n in ("vc-b", "vc-c"):
        vcs[n].inv.put_trust("vc-a", a.cfg.url, a.thumbprint, a.cert_pem, how="linked mode")
        a.inv.put_trust(n, vcs[n].cfg.url, vcs[n].thumbprint, vcs[n].cert_pem, how="linked mode")
        vcs[n].inv.put_admission({"id": "adm-1", "vm": "vm1", "host": "esx-gone", "peer": "vc-a",
                                  "state": "admitted", "created_s": time.time()})
    clients = {n: TestClient(create_app(v, recover=False), base_url=f"https://{v.cfg.fqdn}")
               for n, v in vcs.items()}
    n = Net(vcs, clients, set(), [])
    for v in vcs.values():
        real = v.peer_client

        def via_net(url: str, thumbprint: str, token: str | None = None, audience: str | None = None,
                    real: Any = real) -> VcClient:
            c: VcClient = real(url, thumbprint, token=token, audience=audience)
            c.http = _InProcess(n)       # type: ignore[assignment]
            return c
        v.peer_client = via_net          # type: ignore[method-assign]
    for c in clients.values():
        c.__enter__()
    try:
        yield n
    finally:
        for c in clients.values():
            c.__exit__(None, None, None)


def _message(r: Any) -> str:
    return str(r.json()["messages"][0]["default_message"])


# --- signed peer calls ------------------------------------------------------------------------------------

def test_a_signed_call_for_its_target_is_accepted_once_and_a_replay_is_refused_and_recorded(net: Net) -> None:
    with net.peer("vc-a", "vc-b") as b:
        assert b.audience == "vc-b", "the audience is the name vc-a trusts at that URL"
        assert b.get(ADMISSION, signed=True)["state"] == "admitted"
    (_, method, path, headers), = net.sent
    assert headers[peercall.H_AUDIENCE] == "vc-b" and len(headers[peercall.H_NONCE]) == 32
    replay = net.clients["vc-b"].get(path, headers=headers)
    assert replay.status_code == 403, replay.text
    assert "reuses nonce" in _message(replay) and "replay" in _message(replay)
    (ev,) = net.events("vc-b")
    assert ev["data"]["reason"] == "replayed nonce" and ev["data"]["peer"] == "vc-a"
    assert ev["data"]["method"] == "GET" and ev["data"]["path"] == ADMISSION
    assert headers[peercall.H_SIGNATURE] not in str(ev), "the signature is never recorded"
    # a second, freshly signed call is fine: only the nonce is spent
    with net.peer("vc-a", "vc-b") as b:
        assert b.get(ADMISSION, signed=True)["vm"] == "vm1"


def test_a_call_signed_for_vc_b_is_refused_at_vc_c_which_trusts_the_same_peer(net: Net) -> None:
    with net.peer("vc-a", "vc-b") as b:
        b.get(ADMISSION, signed=True)
    (_, _, path, headers), = net.sent
    r = net.clients["vc-c"].get(path, headers=headers)
    assert r.status_code == 403, r.text
    assert "expected audience vc-c, got vc-b" in _message(r)
    (ev,) = net.events("vc-c")
    assert ev["data"]["reason"] == "wrong audience" and ev["data"]["audience"] == "vc-b"
    assert not net.events("vc-b"), "at vc-b it was a good call"
    # and the audience cannot be edited: it is signed
    r = net.clients["vc-c"].get(path, headers={**headers, peercall.H_AUDIENCE: "vc-c"})
    assert r.status_code == 403 and "signature does not verify" in _message(r)


def test_the_old_format_without_audience_and_nonce_is_refused_with_a_clear_message(net: Net) -> None:
    a = net.vcs["vc-a"]
    ts = f"{time.time():.3f}"
    old = f"GET\n{ADMISSION}\n{ts}\n{hashlib.sha256(b'').hexdigest()}".encode()     # what was signed before
    headers = {peercall.H_PEER: "vc-a", peercall.H_TIME: ts,
               peercall.H_SIGNATURE: base64.b64encode(certs.sign(a.cfg.key, old)).decode()}
    r = net.clients["vc-b"].get(ADMISSION, headers=headers)
    assert r.status_code == 403, r.text
    assert "old format" in _message(r) and "no nonce" in _message(r) and "upgraded" in r.json()["hint"]
    (ev,) = net.events("vc-b")
    assert ev["data"]["reason"] == "malformed"
    # a nonce alone, or a malformed one, does not pass either
    for extra in ({peercall.H_NONCE: "ab" * 16}, {peercall.H_AUDIENCE: "vc-b", peercall.H_NONCE: "../x"}):
        r = net.clients["vc-b"].get(ADMISSION, headers={**headers, **extra})
        assert r.status_code == 403 and "header is missing or not" in _message(r), r.text
    # not signed at all: refused, and recorded too
    r = net.clients["vc-b"].get(ADMISSION)
    assert r.status_code == 403 and "trusted peer" in _message(r)
    assert [e["data"]["reason"] for e in net.events("vc-b")][-1] == "not signed"


def test_a_tampered_body_or_query_and_an_untrusted_signer_are_refused(net: Net) -> None:
    b = net.vcs["vc-b"]
    ts = time.time()

    def check(headers: dict[str, str], target: str, body: bytes = b"", peer: str | None = None) -> str:
        with pytest.raises(Forbidden) as e:
            b.verify_peer(peer or headers[peercall.H_PEER], headers[peercall.H_TIME], headers[peercall.H_AUDIENCE],
                          headers[peercall.H_NONCE], headers[peercall.H_SIGNATURE], "POST", target, body, now_s=ts)
        return str(e.value)

    a_key = net.vcs["vc-a"].cfg.key
    h = peercall.sign("vc-a", a_key, "POST", "/api/x?vm=vm1", b'{"a":1}', "vc-b", now_s=ts)
    assert "does not verify" in check(h, "/api/x?vm=vm1", b'{"a":2}')
    assert "does not verify" in check(h, "/api/x?vm=vm2", b'{"a":1}')
    assert "does not verify" in check(h, "/api/x", b'{"a":1}')
    c_key = net.vcs["vc-c"].cfg.key          # vc-c's key in vc-a's name
    assert "does not verify" in check(peercall.sign("vc-a", c_key, "POST", "/api/x", b"", "vc-b", now_s=ts),
                                      "/api/x")
    assert "does not trust vCenter 'vc-c'" in check(
        peercall.sign("vc-c", c_key, "POST", "/api/x", b"", "vc-b", now_s=ts), "/api/x")
    for bad_ts in ("nan", "inf", "1e9", "-5", "", f"{ts:.3f}\n"):
        assert "Timestamp header" in check({**h, peercall.H_TIME: bad_ts}, "/api/x?vm=vm1", b'{"a":1}')
    assert b.verify_peer("vc-a", h[peercall.H_TIME], "vc-b", h[peercall.H_NONCE], h[peercall.H_SIGNATURE],
                         "POST", "/api/x?vm=vm1", b'{"a":1}', now_s=ts) == "vc-a", "the untouched call passes"
    reasons = [e["data"]["reason"] for e in net.events("vc-b")]
    assert reasons == ["bad signature"] * 4 + ["not trusted"] + ["malformed"] * 6


def test_the_query_a_client_sends_is_the_query_it_signs(net: Net) -> None:
    with net.peer("vc-a", "vc-b") as b:
        assert b.get(ADMISSION, params={"detail": "all"}, signed=True)["id"] == "adm-1"
    (_, _, target, _), = net.sent
    assert target == ADMISSION + "?detail=all"


def test_a_signed_call_without_an_audience_is_not_sent(net: Net) -> None:
    c = VcClient("https://198.18.250.9", thumbprint=net.vcs["vc-b"].thumbprint,
                 peer=("vc-a", net.vcs["vc-a"].cfg.key))
    c.http = _InProcess(net)     # type: ignore[assignment]
    with pytest.raises(Exception, match="audience"):
        c.get(ADMISSION, signed=True)
    assert not net.sent


def test_nonces_out_of_the_window_are_dropped_and_the_memory_is_capped(net: Net,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    b, key = net.vcs["vc-b"], net.vcs["vc-a"].cfg.key
    t0 = 1_900_000_000.0          # the clock is passed in: nothing here depends on the machine's time or speed

    def call(at: float, now: float | None = None, headers: dict[str, str] | None = None) -> dict[str, str]:
        h = headers or peercall.sign("vc-a", key, "GET", ADMISSION, b"", "vc-b", now_s=at)
        b.verify_peer(h[peercall.H_PEER], h[peercall.H_TIME], h[peercall.H_AUDIENCE], h[peercall.H_NONCE],
                      h[peercall.H_SIGNATURE], "GET", ADMISSION, b"", now_s=at if now is None else now)
        return h

    first = [call(t0 + i) for i in range(20)]
    assert b.inv.live_nonces() == 20
    # a window later, each round of calls replaces the last: the memory holds one window's calls, not all
    for k in range(1, 6):
        for i in range(20):
            call(t0 + k * (peercall.WINDOW_S + 1) + i)
        assert b.inv.live_nonces() == 20, k
    # what was dropped cannot come back: its time is outside the window
    with pytest.raises(Forbidden, match="off this vCenter's clock"):
        call(0, now=t0 + 5 * (peercall.WINDOW_S + 1) + 30, headers=first[0])
    # ... and a nonce still inside the window is still known, late or early on the clock
    late = call(t0 + 10_000)
    with pytest.raises(Forbidden, match="reuses nonce"):
        call(0, now=t0 + 10_000 + peercall.WINDOW_S - 1, headers=late)
    # a peer that sends more than the cap within one window is refused, not remembered partly (a cap of 2 here)
    monkeypatch.setattr(peercall, "MAX_LIVE_NONCES", 2)
    t1 = t0 + 20_000
    call(t1)
    call(t1 + 1)
    with pytest.raises(Forbidden, match="refusing more until they age out"):
        call(t1 + 2)
    assert b.inv.live_nonces() == peercall.MAX_LIVE_NONCES
    assert net.events("vc-b")[-1]["data"]["reason"] == "too many calls"


def test_the_nonce_memory_survives_a_restart_of_the_receiver(net: Net) -> None:
    b = net.vcs["vc-b"]
    h = peercall.sign("vc-a", net.vcs["vc-a"].cfg.key, "GET", ADMISSION, b"", "vc-b")
    args = (h[peercall.H_PEER], h[peercall.H_TIME], h[peercall.H_AUDIENCE], h[peercall.H_NONCE],
            h[peercall.H_SIGNATURE], "GET", ADMISSION, b"")
    assert b.verify_peer(*args) == "vc-a"
    again = VCenter(b.cfg)            # the same directory: what a restarted vCenter opens
    try:
        with pytest.raises(Forbidden, match="reuses nonce"):
            again.verify_peer(*args)
    finally:
        again.inv.close()


# --- sessions in linked mode ------------------------------------------------------------------------------

def _login(net: Net, at: str) -> str:
    r = net.clients[at].post("/api/session", auth=(ADMIN, PASSWORD))
    assert r.status_code == 201, r.text
    return str(r.json())


def _use(net: Net, at: str, token: str) -> Any:
    return net.clients[at].get("/api/vcenter/datacenter", headers={"vmware-api-session-id": token})


def test_a_session_logged_out_at_vc_a_is_refused_at_its_linked_peer_vc_b(net: Net) -> None:
    token = _login(net, "vc-a")
    assert _use(net, "vc-b", token).status_code == 200, "linked mode: vc-a's session is good at vc-b"
    r = net.clients["vc-b"].get("/api/session", headers={"vmware-api-session-id": token})
    assert r.json()["issuer"] == "vc-a" and r.json()["vcenter"] == "vc-b"
    # vc-b is told nothing at the logout (it could be down): it asks vc-a whenever the session is used
    sent = len(net.sent)
    assert net.clients["vc-a"].delete("/api/session", headers={"vmware-api-session-id": token}).status_code == 204
    assert len(net.sent) == sent
    assert _use(net, "vc-a", token).status_code == 401
    r = _use(net, "vc-b", token)
    assert r.status_code == 401 and "vc-a, which issued this session, no longer accepts it" in _message(r), r.text
    sid = sso.verify(net.vcs["vc-b"].secret, DOMAIN, token).sid
    assert net.vcs["vc-b"].inv.revoked(sid), "vc-b recorded it: refused from now on without asking"
    net.down.add("vc-a")
    assert _use(net, "vc-b", token).status_code == 401
    # vc-c, which never saw the session nor its logout (a vCenter that was down, or restarted), refuses it too
    net.down.clear()
    assert not net.vcs["vc-c"].inv.revoked(sid)
    assert _use(net, "vc-c", token).status_code == 401


def test_vc_b_refuses_a_session_of_vc_a_it_cannot_check_and_accepts_it_again_once_it_can(net: Net) -> None:
    token = _login(net, "vc-a")
    net.down.add("vc-a")
    r = _use(net, "vc-b", token)
    assert r.status_code == 503, r.text
    assert "cannot check this session with vCenter vc-a" in _message(r) and "vc-b" in r.json()["hint"]
    net.down.clear()
    assert _use(net, "vc-b", token).status_code == 200


def test_a_logout_at_vc_b_of_vc_a_s_session_is_done_at_vc_a_or_not_at_all(net: Net) -> None:
    token = _login(net, "vc-a")
    hdr = {"vmware-api-session-id": token}
    net.down.add("vc-a")
    r = net.clients["vc-b"].delete("/api/session", headers=hdr)
    assert r.status_code == 503, "vc-b cannot even check the session, let alone log it out at vc-a"
    net.down.clear()
    assert _use(net, "vc-a", token).status_code == 200, "nothing was revoked: the logout can be retried"
    assert net.clients["vc-b"].delete("/api/session", headers=hdr).status_code == 204
    for at in ("vc-a", "vc-b", "vc-c"):
        assert _use(net, at, token).status_code == 401, at
    (ev,) = net.events("vc-b", "UserLogoutSessionEvent")
    assert "a session of vCenter vc-a, logged out there too" in ev["message"]
    assert net.events("vc-a", "UserLogoutSessionEvent"), "vc-a recorded the logout of its session"


def test_sessions_of_an_untrusted_issuer_or_without_one_are_refused(net: Net) -> None:
    secret = net.vcs["vc-b"].secret
    foreign, _ = sso.issue(secret, ADMIN, DOMAIN, 60, issuer="vc-z")
    r = _use(net, "vc-b", foreign)
    assert r.status_code == 401 and "issued by vCenter vc-z, which vc-b has no trust with" in _message(r)
    payload = base64.urlsafe_b64encode(json.dumps({"u": ADMIN, "d": DOMAIN, "sid": "ab" * 12, "iat": 1,
                                                   "exp": time.time() + 60}).encode()).rstrip(b"=").decode()
    sig = base64.urlsafe_b64encode(hmac.new(secret, payload.encode(), hashlib.sha256).digest()).rstrip(b"=")
    r = _use(net, "vc-b", f"{payload}.{sig.decode()}")
    assert r.status_code == 401 and "names no issuing vCenter" in _message(r)
    # a session vc-b issued itself is checked here alone: vc-a down changes nothing
    net.down.add("vc-a")
    assert _use(net, "vc-b", _login(net, "vc-b")).status_code == 200


async def test_a_linked_relocate_reaches_its_peer_with_its_own_session_and_signs_for_it(net: Net) -> None:
    """What a relocate to a linked vCenter does first (``Trust._connect_peer``, no credentials): a session vc-a
    issues itself, which vc-b checks with vc-a, and signed calls addressed to vc-b."""
    a, b = net.vcs["vc-a"], net.vcs["vc-b"]
    peer, about = await a._connect_peer({"url": b.cfg.url, "thumbprint": b.thumbprint}, ADMIN)
    try:
        assert about["name"] == "vc-b" and peer.audience == "vc-b"
        assert (await peer.aget(ADMISSION, signed=True))["state"] == "admitted"
        assert any(to == "vc-a" and path == "/api/session" for to, _, path, _ in net.sent), "vc-b asked vc-a"
        await peer.alogout()        # what the relocate does at its end: the session is gone at both
        assert peer.token is None
    finally:
        peer.close()
    assert not net.events("vc-b")
    (ev,) = net.events("vc-a", "UserLogoutSessionEvent")
    assert ev["data"]["issuer"] == "vc-a"


def test_a_trusted_peers_malformed_admission_is_a_400_before_any_work(net: Net) -> None:
    """A peer vCenter's admission body is checked at the edge like any other (issue 17: no 500, ever): no spec,
    a spec that is not one, a spec of another VM, an extra field: each a 400 naming the field, no placeholder."""
    from testbed.errors import ApiError
    from testbed.qemu.spec import BootSpec, VmSpec
    good = VmSpec(name="x1", memory_bytes=128 * 2**20, boot=BootSpec(kernel="/k", builtin=True)).model_dump(mode="json")
    token = sso.issue(net.vcs["vc-b"].secret, ADMIN, DOMAIN, 600, issuer="vc-b")[0]
    bad = [({"name": "x1"}, "spec"), ({"name": "x1", "spec": {"memory_bytes": "lots"}}, "spec"),
           ({"name": "x2", "spec": good}, "not 'x2'"), ({"name": "x1", "spec": good, "evil": 1}, "evil"),
           ({"name": "/", "spec": good}, "name")]
    for vm, words in bad:
        with net.peer("vc-a", "vc-b", token=token) as b, pytest.raises(ApiError) as e:
            b.post("/api/testbed/xvmotion/admit", {"vm": vm, "host": "esx-t1", "source_vcenter": "vc-a"},
                   signed=True)
        assert e.value.status == 400 and words in str(e.value), (vm, e.value)
    assert net.vcs["vc-b"].inv.vm("x1") is None and net.vcs["vc-b"].inv.vm("x2") is None
