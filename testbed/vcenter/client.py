"""A small Python client of the vCenter API (requests), with certificate pinning.

    vc = VcClient("https://198.18.0.2", thumbprint="AB:CD:...", netns="tb-vc-a")
    vc.login("administrator@vsphere-a.local", password)
    vc.get("/api/vcenter/vm")

The server's certificate is self-signed: the client pins its SHA-256
thumbprint (urllib3's ``assert_fingerprint``) and refuses anything else. With
``netns`` the TCP connection starts inside that network namespace (the lab's
management network is not reachable from the machine's own namespace).
Errors come back as ``ApiError`` with the HTTP status and the server's message; a 404 as ``NotFound``, a 409 as
``Conflict``, a 403 as ``ApiForbidden`` (both a ``Forbidden`` and an ``ApiError``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool

from testbed.errors import (
    ApiError,
    ApiForbidden,
    Conflict,
    HostUnreachable,
    InputError,
    NotFound,
    TestbedError,
    ThumbprintMismatch,
)
from testbed.net.cmd import socket_in_netns
from testbed.vcenter import certs, peercall

SESSION_HEADER = "vmware-api-session-id"


def _netns_connection(netns: str) -> type[HTTPSConnection]:
    class NetnsHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = socket_in_netns(netns)
            try:
                sock.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else 30)
                sock.connect((self._dns_host, self.port))
            except OSError as err:
                sock.close()
                raise urllib3.exceptions.NewConnectionError(
                    self, f"cannot connect to {self._dns_host}:{self.port} from namespace {netns}: {err}") from err
            return sock
    return NetnsHTTPSConnection


class _PinnedAdapter(HTTPAdapter):
    def __init__(self, thumbprint: str | None, cafile: Path | None, netns: str | None) -> None:
        self._thumbprint = thumbprint
        self._cafile = cafile
        self._netns = netns
        super().__init__(max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kw: Any) -> None:
        if self._thumbprint:
            kw.update(assert_fingerprint=self._thumbprint.replace(":", "").lower(), cert_reqs="CERT_NONE")
        elif self._cafile:
            kw.update(ca_certs=str(self._cafile), cert_reqs="CERT_REQUIRED")
        super().init_poolmanager(connections, maxsize, block, **kw)
        if self._netns:
            cls = type("NetnsPool", (HTTPSConnectionPool,), {"ConnectionCls": _netns_connection(self._netns)})
            self.poolmanager.pool_classes_by_scheme = {"https": cls}


class VcClient:
    def __init__(self, url: str, *, thumbprint: str | None = None, cafile: Path | None = None,
                 netns: str | None = None, token: str | None = None, timeout_s: float = 60.0,
                 peer: tuple[str, Path] | None = None, audience: str | None = None) -> None:
        if not url.startswith("https://"):
            raise InputError(f"vCenter URL {url!r} must start with https://")
        if thumbprint is None and cafile is None:
            raise InputError(f"no way to trust {url}: give its certificate thumbprint",
                             hint="`testbed vcenter show NAME` prints it")
        self.url = url.rstrip("/")
        self.thumbprint = certs.normalize(thumbprint) if thumbprint else None
        self.timeout_s = timeout_s
        self.peer = peer              # (this vCenter's name, its key): signs peer calls
        self.audience = audience      # the name of the vCenter at ``url``: who its signed calls are for
        self.http = requests.Session()
        # Never a proxy or a CA bundle from the environment: lab traffic goes to the lab, checked by its pin.
        self.http.trust_env = False
        self.http.mount("https://", _PinnedAdapter(self.thumbprint, cafile, netns))
        if self.thumbprint:
            # no CA check: the pinned thumbprint is the check (requests would otherwise ask for a CA chain)
            self.http.verify = False
        elif cafile:
            self.http.verify = str(cafile)
        self.token = token

    # --- plumbing -------------------------------------------------------------------
    def request(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
                auth: tuple[str, str] | None = None, signed: bool = False, timeout_s: float | None = None,
                upload: Path | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if upload is not None:          # a file's bytes as the body, streamed (a content library item)
            return self._upload(method, path, upload, params, headers, timeout_s)
        if self.token:
            headers[SESSION_HEADER] = self.token
        if signed:
            if params:
                # the query is part of what is signed: sent exactly as signed
                path, params = f"{path}?{urllib.parse.urlencode(params)}", None
            headers.update(self._signature(method, path, data))
        try:
            r = self.http.request(method, self.url + path, data=data or None, params=params, headers=headers,
                                  auth=auth, timeout=timeout_s or self.timeout_s)
        except requests.exceptions.SSLError as err:
            if "Fingerprints did not match" in str(err):
                raise ThumbprintMismatch(
                    f"{self.url} presented a certificate whose SHA-256 thumbprint is not the pinned "
                    f"{self.thumbprint}: refusing to talk to it ({_got(err)})",
                    hint="check the destination vCenter's thumbprint (`testbed vcenter show NAME`); "
                         "if its certificate was replaced on purpose, pass the new thumbprint") from err
            raise HostUnreachable(f"TLS with {self.url} failed: {err}") from err
        except requests.exceptions.ConnectionError as err:
            raise HostUnreachable(f"cannot reach vCenter {self.url}: {_reason(err)}",
                                  hint="is the vCenter up (`testbed lab status`) and the URL right?") from err
        except requests.exceptions.Timeout as err:
            raise HostUnreachable(f"vCenter {self.url} did not answer {method} {path} in time") from err
        return self._answer(r, method, path)

    def _answer(self, r: requests.Response, method: str, path: str) -> Any:
        """The JSON of an answer, or its error as ``ApiError`` (``NotFound``, ``Conflict``, ``ApiForbidden``)
        with the server's words."""
        if r.status_code >= 400:
            try:
                e = r.json()
                msg = "; ".join(m.get("default_message", "") for m in e.get("messages", [])) or r.text
                kind, hint = e.get("error_type", "ERROR"), e.get("hint")
            except ValueError:
                msg, kind, hint = r.text.strip() or r.reason, "ERROR", None
            cls = {404: NotFound, 409: Conflict}.get(r.status_code)
            if cls is not None:
                raise cls(msg, hint=hint)
            if r.status_code == 403:
                raise ApiForbidden(403, f"{method} {path}: HTTP 403 {kind}: {msg}", error_type=kind, hint=hint)
            raise ApiError(r.status_code, f"{method} {path}: HTTP {r.status_code} {kind}: {msg}",
                           error_type=kind, hint=hint)
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    def _upload(self, method: str, path: str, file: Path, params: dict[str, Any] | None, headers: dict[str, str],
                timeout_s: float | None) -> Any:
        headers = {**headers, "Content-Type": "application/octet-stream"}
        if self.token:
            headers[SESSION_HEADER] = self.token
        with file.open("rb") as f:
            try:
                r = self.http.request(method, self.url + path, data=f, params=params, headers=headers,
                                      timeout=timeout_s or max(self.timeout_s, 600))
            except requests.exceptions.RequestException as err:
                raise HostUnreachable(f"uploading {file} to vCenter {self.url} failed: {_reason(err)}") from err
        return self._answer(r, method, path)

    def _signature(self, method: str, target: str, data: bytes) -> dict[str, str]:
        if self.peer is None or self.audience is None:
            raise InputError(f"a signed call ({method} {target}) to {self.url} needs this vCenter's name and key "
                             "and the name of the vCenter it is for (its audience)",
                             hint="peer clients come from Trust.peer_client, which knows both")
        name, key = self.peer
        return peercall.sign(name, key, method, target, data, self.audience)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, body=body, **kw)

    def patch(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("PATCH", path, body=body, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    # --- session ----------------------------------------------------------------------
    def login(self, user: str, password: str) -> str:
        self.token = str(self.post("/api/session", auth=(user, password)))
        return self.token

    def logout(self) -> None:
        if self.token:
            self.delete("/api/session")
            self.token = None

    # --- the same calls for async code (a vCenter calling its peers, the bench, the demo): requests blocks, so
    # each runs in a worker thread; the one place that knows it (callers never wrap a call in to_thread)
    async def arequest(self, method: str, path: str, **kw: Any) -> Any:
        return await asyncio.to_thread(self.request, method, path, **kw)

    async def aget(self, path: str, **kw: Any) -> Any:
        return await self.arequest("GET", path, **kw)

    async def apost(self, path: str, body: Any = None, **kw: Any) -> Any:
        return await self.arequest("POST", path, body=body, **kw)

    async def apatch(self, path: str, body: Any = None, **kw: Any) -> Any:
        return await self.arequest("PATCH", path, body=body, **kw)

    async def adelete(self, path: str, **kw: Any) -> Any:
        return await self.arequest("DELETE", path, **kw)

    async def alogin(self, user: str, password: str) -> str:
        return await asyncio.to_thread(self.login, user, password)

    async def alogout(self) -> None:
        await asyncio.to_thread(self.logout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> VcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_task(self, task_id: str, timeout_s: float | None = 900.0, on_update: Any = None) -> dict[str, Any]:
        """Poll the task until it ends; ``timeout_s`` None: for as long as it runs (the task has its own limits)."""
        deadline = time.monotonic() + timeout_s if timeout_s is not None else float("inf")
        while True:
            t: dict[str, Any] = self.get(f"/api/cis/tasks/{task_id}")
            if on_update:
                on_update(t)
            if t["status"] in ("SUCCEEDED", "FAILED"):
                return t
            if time.monotonic() > deadline:
                raise TestbedError(f"task {task_id} still {t['status']} after {timeout_s or 0:.0f} s",
                                   hint=f"`testbed task watch {task_id}` follows it")
            time.sleep(0.5)

    async def await_task(self, task_id: str, timeout_s: float | None = 900.0, on_update: Any = None) -> dict[str, Any]:
        """``wait_task`` for async code: the polls in a worker thread, the waits between them on the loop."""
        deadline = time.monotonic() + timeout_s if timeout_s is not None else float("inf")
        while True:
            t: dict[str, Any] = await self.aget(f"/api/cis/tasks/{task_id}")
            if on_update:
                on_update(t)
            if t["status"] in ("SUCCEEDED", "FAILED"):
                return t
            if time.monotonic() > deadline:
                raise TestbedError(f"task {task_id} still {t['status']} after {timeout_s or 0:.0f} s",
                                   hint=f"`testbed task watch {task_id}` follows it")
            await asyncio.sleep(0.5)


def _got(err: Exception) -> str:
    text = str(err)
    i = text.find("got ")
    return ("it presented " + text[i + 4:].split(".")[0].split("'")[0]) if i >= 0 else text


def _reason(err: Exception) -> str:
    text = str(err)
    for marker in ("Failed to establish a new connection: ", "cannot connect to "):
        if marker in text:
            return text[text.index(marker):].split("'))")[0].rstrip(")")
    return text


def fetch_thumbprint(address: str, port: int = 443, netns: str | None = None, timeout_s: float = 10.0) -> str:
    """The SHA-256 thumbprint of the certificate a server presents (what the user then pins)."""
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sock = socket_in_netns(netns) if netns else socket.socket()
    sock.settimeout(timeout_s)
    try:
        sock.connect((address, port))
        with ctx.wrap_socket(sock) as tls:
            der = tls.getpeercert(binary_form=True)
    finally:
        sock.close()
    assert der is not None
    return certs.thumbprint_der(der)
