"""The vCenter's HTTPS API (FastAPI), shaped after the vSphere Automation REST API.

Every route but ``POST /api/session`` needs a session token in the
``vmware-api-session-id`` header. Errors are JSON in vSphere's shape,
``{"error_type": ..., "messages": [{"default_message": ...}], "hint": ...}``,
with the HTTP status that fits: 400 bad input (malformed JSON and unknown
fields included), 401 no/expired/foreign token, 403 not allowed (an untrusted
peer), 404 unknown object, 409 busy or already there, 503 a host or peer
that does not answer or could not do what was asked.

    POST   /api/session                          log in (basic auth) -> token
    GET    /api/session | DELETE /api/session    who am I | log out
    GET    /api/vcenter/datacenter | cluster | datastore | network
    GET    /api/vcenter/host | POST (add) | GET/PATCH/DELETE /api/vcenter/host/{host}
    GET    /api/vcenter/vm | POST (create) | GET/DELETE /api/vcenter/vm/{vm}
    POST   /api/vcenter/vm/{vm}/power?action=start|stop
    POST   /api/vcenter/vm/{vm}?action=relocate  -> {"task": id}
    GET    /api/cis/tasks | /api/cis/tasks/{task}
    GET    /api/testbed/events | about | trust;  POST /api/testbed/reconcile
    GET    /api/testbed/images | GET /api/testbed/images/{name}   the content library's items (VM kernels,
           initrds, disk images) | POST /api/testbed/images?name=N[&kind=K] (the file as the body; admin)
           | DELETE /api/testbed/images/{name} (admin)
    GET    /api/testbed/source-copies | DELETE /api/testbed/source-copies/{vm}   what an unverified
           (or after-switchover failed) move kept on its source host | discard it
    peer vCenters (signed requests, ``peercall``): /api/testbed/trust/challenge, /api/testbed/trust,
    /api/testbed/xvmotion/precheck | admit | {id} | {id}/commit | {id}/abort

A session issued by another vCenter of the domain (linked mode) is checked with its issuer on every use
(``GET /api/session`` there, with the token), and logged out there first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict, Field, field_validator

from testbed.errors import (
    ApiError,
    Conflict,
    Forbidden,
    HostError,
    HostUnreachable,
    InputError,
    NotFound,
    TestbedError,
    ThumbprintMismatch,
    Unauthorized,
)
from testbed.migration.convergence import normalize
from testbed.names import ITEM_NAME_RULE, item_name_ok
from testbed.units import parse_rate_bytes, parse_size
from testbed.vcenter import sso
from testbed.vcenter.service import VCenter

log = logging.getLogger("testbed.vcenter.api")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AddHost(_In):
    hostname: str = Field(min_length=1, max_length=253)
    user_name: str = "root"
    password: str
    thumbprint: str | None = None          # the host's SSH key fingerprint (SHA256:...), pinned if given
    cluster: str | None = None
    license: str | None = None


class HostPatch(_In):
    license: str


class Placement(_In):
    host: str = Field(min_length=1)
    datastore: str | None = None
    network: str | None = None             # the port group the VM's NICs use at the destination


class CreateVm(_In):
    name: str = Field(min_length=1, max_length=64)
    placement: Placement
    memory: str | int = "512M"
    disk: str | int | None = None
    workload: str = "idle"
    cpu_count: int = Field(default=1, ge=1, le=16)
    power_on: bool = True
    encrypted: bool = False                # the VM's disk is LUKS-encrypted (cross-vCenter vMotion refuses it)
    kernel: str | None = None              # the user's own guest: kernel (+ initrd, append), content library items
    initrd: str | None = None
    append: str | None = None
    image: str | None = None               # or a bootable disk image (a library item), copied to the datastore

    @field_validator("kernel", "initrd", "image")
    @classmethod
    def _library_item(cls, v: str | None) -> str | None:
        if v is not None and not item_name_ok(v):
            raise ValueError(f"{v!r} is not a content library item name ({ITEM_NAME_RULE}); "
                             "`testbed image list` shows the items")
        return v


class DestinationVcenter(_In):
    url: str
    user_name: str | None = None
    password: str | None = None
    thumbprint: str | None = None


class RelocateOptions(_In):
    """A relocate's engine options, each checked here (a 400 before any work), not in the middle of the move."""
    streams: int | None = Field(default=None, ge=1, le=16)
    converge: str | None = None
    allow_postcopy: bool | None = None
    bandwidth: str | int | None = None      # bytes/s, or a rate ("30MiB/s", "240Mbit/s")
    downtime_limit_ms: int | None = Field(default=None, ge=1, le=60000)
    completion_timeout_s: float | None = Field(default=None, gt=0)
    accept_unverified: bool | None = None   # remove the source copy even when a check could not be made
    mirror_mode: Literal["write-blocking", "background-throttled"] | None = None
    mirror_granularity: int | None = Field(default=None, ge=512, le=64 * 2**20)   # bytes, a power of 2

    @field_validator("converge")
    @classmethod
    def _known_mode(cls, v: str | None) -> str | None:
        try:
            return None if v is None else normalize(v)
        except TestbedError as err:
            raise ValueError(f"{err.message}; {err.hint}") from None

    @field_validator("bandwidth")
    @classmethod
    def _positive_rate(cls, v: str | int | None) -> int | None:
        try:
            bps = parse_rate_bytes(v, what="bandwidth") if isinstance(v, str) else v
        except TestbedError as err:
            raise ValueError(err.message) from None
        if bps is not None and bps <= 0:
            raise ValueError(f"bandwidth {v!r}: give a rate above zero (or leave it out: the link's own)")
        return bps

    @field_validator("mirror_granularity")
    @classmethod
    def _power_of_two(cls, v: int | None) -> int | None:
        if v is not None and v & (v - 1):
            raise ValueError(f"mirror_granularity {v}: QEMU takes a power of 2 (512 B to 64 MiB)")
        return v


class RelocateSpec(_In):
    placement: Placement
    destination_vcenter: DestinationVcenter | None = None
    options: RelocateOptions = RelocateOptions()


class Relocate(_In):
    spec: RelocateSpec


class TrustRequest(_In):
    name: str
    url: str
    certificate: str
    nonce: str
    signature: str


class IncomingPrecheck(_In):
    vm: dict[str, Any]
    source_facts: dict[str, Any]
    host: str
    datastore: str | None = None
    source_names: list[str] = []


class Admit(_In):
    vm: dict[str, Any]
    host: str
    datastore: str | None = None
    source_vcenter: str
    source_task: str | None = None
    move_timeout_s: float | None = Field(default=None, gt=0)   # the source's limit for the move: the ticket's life


_STATUS: list[tuple[type[Exception], int, str]] = [
    (Unauthorized, 401, "UNAUTHENTICATED"), (Forbidden, 403, "UNAUTHORIZED"), (NotFound, 404, "NOT_FOUND"),
    (Conflict, 409, "RESOURCE_BUSY"), (InputError, 400, "INVALID_ARGUMENT"),
    (ThumbprintMismatch, 400, "INVALID_ARGUMENT"), (HostUnreachable, 503, "SERVICE_UNAVAILABLE"),
    (HostError, 503, "SERVICE_UNAVAILABLE"),     # a host could not do it (its agent says why): not our 500
]


def status_of(err: TestbedError) -> tuple[int, str]:
    """The HTTP status and vSphere error type of an error the service raised (500 only for what none names)."""
    for cls, st, k in _STATUS:
        if isinstance(err, cls):
            return st, k
    return (err.status, err.error_type) if isinstance(err, ApiError) else (500, "ERROR")


def error_body(kind: str, message: str, hint: str | None = None) -> dict[str, Any]:
    return {"error_type": kind, "messages": [{"default_message": message, "args": [], "id": kind.lower()}],
            "hint": hint}


_basic = HTTPBasic(auto_error=False)


def _vc(request: Request) -> VCenter:
    vc: VCenter = request.app.state.vc
    return vc


def _session(request: Request,
             token: Annotated[str | None, Header(alias="vmware-api-session-id")] = None) -> sso.Session:
    return _vc(request).authenticate(token)


async def _peer(request: Request, x_testbed_peer: Annotated[str | None, Header()] = None,
                x_testbed_timestamp: Annotated[str | None, Header()] = None,
                x_testbed_audience: Annotated[str | None, Header()] = None,
                x_testbed_nonce: Annotated[str | None, Header()] = None,
                x_testbed_signature: Annotated[str | None, Header()] = None) -> str:
    """A request from a trusted peer vCenter: signed with the key of the certificate we trust for it, for this
    vCenter, once (``peercall``)."""
    body = await request.body()
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return _vc(request).verify_peer(x_testbed_peer, x_testbed_timestamp, x_testbed_audience, x_testbed_nonce,
                                    x_testbed_signature, request.method, target, body)


Session = Annotated[sso.Session, Depends(_session)]
Peer = Annotated[str, Depends(_peer)]
Basic = Annotated[HTTPBasicCredentials | None, Depends(_basic)]


def _admin_of(vc: VCenter, s: sso.Session) -> None:
    row = vc.inv.user(s.user)
    if row is None or row["role"] != "Admin":
        raise Forbidden(f"user {s.user} may not change the content library of vCenter {vc.cfg.name}",
                        hint="log in as an administrator of the SSO domain")


def create_app(vc: VCenter, *, recover: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if recover:
            await vc.recover()
        loop = asyncio.get_running_loop().create_task(vc.reconcile_forever())
        yield
        loop.cancel()
        await vc.close()

    app = FastAPI(title=f"testbed vCenter {vc.cfg.name}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.vc = vc

    def _admin(s: sso.Session) -> None:
        _admin_of(vc, s)

    @app.exception_handler(TestbedError)
    async def _testbed_error(request: Request, err: TestbedError) -> JSONResponse:
        status, kind = status_of(err)
        return JSONResponse(error_body(kind, str(err.args[0]) if err.args else str(err), err.hint),
                            status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{loc}: {e.get('msg')}")
        return JSONResponse(error_body("INVALID_ARGUMENT", "malformed request: " + "; ".join(parts),
                                       "see GET /api/openapi.json for the request shapes"), status_code=400)

    # --- session ------------------------------------------------------------------------
    @app.post("/api/session", status_code=201)
    def login(creds: Basic) -> str:
        if creds is None:
            raise Unauthorized("log in with HTTP basic authentication (user@domain and password)")
        return vc.login(creds.username, creds.password)

    @app.get("/api/session")
    def whoami(s: Session) -> dict[str, Any]:
        # a linked vCenter asks the issuer of a session this way whether it still holds ("vcenter": the issuer)
        return {"user": s.user, "domain": s.domain, "created_time": s.issued_s, "expires_time": s.expires_s,
                "vcenter": vc.cfg.name, "issuer": s.issuer}

    @app.delete("/api/session", status_code=204)
    def logout(s: Session, token: Annotated[str | None, Header(alias="vmware-api-session-id")] = None) -> None:
        vc.logout(s, token)

    # --- inventory ------------------------------------------------------------------------
    @app.get("/api/vcenter/datacenter")
    def datacenters(s: Session) -> list[dict[str, Any]]:
        return [{"datacenter": vc.cfg.datacenter, "name": vc.cfg.datacenter}]

    @app.get("/api/vcenter/cluster")
    def clusters(s: Session) -> list[dict[str, Any]]:
        names = sorted({h["cluster"] for h in vc.inv.hosts()} | {vc.cfg.cluster})
        return [{"cluster": n, "name": n, "hosts": [h["name"] for h in vc.inv.hosts() if h["cluster"] == n]}
                for n in names]

    @app.get("/api/vcenter/host")
    def hosts(s: Session) -> list[dict[str, Any]]:
        return [vc.host_summary(h) for h in vc.inv.hosts()]

    @app.post("/api/vcenter/host", status_code=201)
    async def add_host(s: Session, body: AddHost) -> dict[str, Any]:
        return await vc.add_host(body.hostname, body.user_name, body.password, thumbprint=body.thumbprint,
                                 cluster=body.cluster, license=body.license)

    @app.get("/api/vcenter/host/{host}")
    async def host(s: Session, host: str) -> dict[str, Any]:
        vc.managed(host)
        h = await vc.refresh_host(host)
        return {**vc.host_summary(h), "facts": h["facts"]}

    @app.patch("/api/vcenter/host/{host}")
    def patch_host(s: Session, host: str, body: HostPatch) -> dict[str, Any]:
        return vc.set_license(host, body.license)

    @app.delete("/api/vcenter/host/{host}", status_code=204)
    async def remove_host(s: Session, host: str) -> None:
        await vc.remove_host(host)

    @app.get("/api/vcenter/datastore")
    def datastores(s: Session, host: str | None = None) -> list[dict[str, Any]]:
        return vc.datastores(host)

    @app.get("/api/vcenter/network")
    def networks(s: Session) -> list[dict[str, Any]]:
        return vc.networks()

    # --- VMs --------------------------------------------------------------------------------
    @app.get("/api/vcenter/vm")
    async def vms(s: Session) -> list[dict[str, Any]]:
        return await vc.list_vms()

    @app.post("/api/vcenter/vm", status_code=201)
    async def create_vm(s: Session, body: CreateVm) -> dict[str, Any]:
        memory = parse_size(body.memory, what="memory") if isinstance(body.memory, str) else body.memory
        disk = parse_size(body.disk, what="disk") if isinstance(body.disk, str) else body.disk
        return await vc.create_vm(body.name, body.placement.host, memory, disk, datastore=body.placement.datastore,
                                  network=body.placement.network, workload=body.workload, vcpus=body.cpu_count,
                                  start=body.power_on, encrypted=body.encrypted, kernel=body.kernel,
                                  initrd=body.initrd, append=body.append, image=body.image, user=s.user)

    @app.get("/api/vcenter/vm/{vm}")
    async def vm(s: Session, vm: str) -> dict[str, Any]:
        return await vc.vm_info(vm)

    @app.get("/api/vcenter/vm/{vm}/console")
    async def console(s: Session, vm: str) -> dict[str, Any]:
        return await vc.console_log(vm)

    @app.delete("/api/vcenter/vm/{vm}", status_code=204)
    async def delete_vm(s: Session, vm: str) -> None:
        await vc.delete_vm(vm, user=s.user)

    @app.post("/api/vcenter/vm/{vm}/power")
    async def power(s: Session, vm: str, action: Annotated[Literal["start", "stop"], Query()]) -> dict[str, Any]:
        return await vc.power(vm, action, user=s.user)

    @app.post("/api/vcenter/vm/{vm}", status_code=202)
    async def vm_action(s: Session, vm: str, action: Annotated[Literal["relocate"], Query()],
                  body: Relocate) -> dict[str, Any]:
        o = body.spec.options
        opts: dict[str, Any] = o.model_dump(exclude_none=True, exclude={"bandwidth"})
        if o.bandwidth is not None:
            opts["bandwidth_bps"] = o.bandwidth    # a number of bytes/s once validated
        dest = body.spec.destination_vcenter.model_dump() if body.spec.destination_vcenter else None
        t = vc.start_relocate(vm, body.spec.placement.model_dump(), dest, opts, s.user)
        return {"task": t["id"]}

    # --- tasks and events ---------------------------------------------------------------------
    @app.get("/api/cis/tasks")
    def tasks(s: Session, status: str | None = None) -> list[dict[str, Any]]:
        return [vc.task_view(t) for t in vc.inv.tasks(state=status.upper() if status else None)]

    @app.get("/api/cis/tasks/{task}")
    def task(s: Session, task: str) -> dict[str, Any]:
        return vc.task_view(vc.task(task))

    @app.get("/api/testbed/events")
    def events(s: Session, vm: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        return vc.inv.events(vm=vm, since_id=since)

    @app.get("/api/testbed/source-copies")
    def source_copies(s: Session) -> list[dict[str, Any]]:
        return [{k: c[k] for k in ("vm", "host", "task", "kept_s", "moved_to", "destination_vcenter", "why")
                 if k in c} for c in vc.inv.source_copies()]

    @app.delete("/api/testbed/source-copies/{vm}")
    async def discard_source(s: Session, vm: str) -> dict[str, Any]:
        return await vc.discard_source(vm, user=s.user)

    # --- the content library ------------------------------------------------------------------
    @app.get("/api/testbed/images")
    def images(s: Session) -> list[dict[str, Any]]:
        return vc.library.items_list()

    @app.get("/api/testbed/images/{name}")
    def image(s: Session, name: str) -> dict[str, Any]:
        return vc.library.get(name)

    @app.post("/api/testbed/images", status_code=201)
    async def add_image(s: Session, request: Request, name: Annotated[str, Query(max_length=63)],
                        kind: Annotated[Literal["kernel", "initrd", "disk"] | None, Query()] = None) -> dict[str, Any]:
        _admin(s)
        return await vc.add_image(name, request.stream(), kind=kind, user=s.user)

    @app.delete("/api/testbed/images/{name}", status_code=204)
    def remove_image(s: Session, name: str) -> None:
        _admin(s)
        vc.remove_image(name, user=s.user)

    @app.post("/api/testbed/reconcile")
    async def reconcile(s: Session) -> dict[str, Any]:
        return await vc.reconcile()

    @app.get("/api/testbed/about")
    def about(s: Session) -> dict[str, Any]:
        return vc.about()

    @app.get("/api/testbed/trust")
    def trusts(s: Session) -> list[dict[str, Any]]:
        return [{k: t[k] for k in ("name", "url", "thumbprint", "added_s", "how")} for t in vc.inv.trusts()]

    @app.delete("/api/testbed/trust/{name}", status_code=204)
    def untrust(s: Session, name: str) -> None:
        if vc.inv.trust(name) is None:
            raise NotFound(f"vCenter {vc.cfg.name} has no trust with {name!r}")
        vc.inv.delete_trust(name)
        vc.inv.event("TrustRemovedEvent", f"trust with vCenter {name} removed by {s.user}")

    # --- peer vCenters ----------------------------------------------------------------------------
    @app.post("/api/testbed/trust/challenge")
    def challenge(s: Session) -> str:
        return vc.challenge()

    @app.post("/api/testbed/trust", status_code=204)
    def trust(s: Session, body: TrustRequest) -> None:
        try:
            sig = base64.b64decode(body.signature, validate=True)
        except (binascii.Error, ValueError) as err:
            raise InputError("signature is not base64") from err
        vc.accept_trust(s, body.name, body.url, body.certificate, body.nonce, sig)

    @app.post("/api/testbed/xvmotion/precheck")
    async def incoming_precheck(s: Session, who: Peer, body: IncomingPrecheck) -> dict[str, Any]:
        return await vc.incoming_precheck(body.vm, body.source_facts, body.host, body.datastore or "",
                                          body.source_names)

    @app.post("/api/testbed/xvmotion/admit", status_code=201)
    async def admit(s: Session, who: Peer, body: Admit) -> dict[str, Any]:
        if body.source_vcenter != who:
            raise Forbidden(f"request signed by {who} but names {body.source_vcenter} as the source")
        return await vc.admit(who, body.model_dump())

    @app.get("/api/testbed/xvmotion/{aid}")
    async def admission(who: Peer, aid: str) -> dict[str, Any]:
        return await vc.admission_status(who, aid)

    @app.post("/api/testbed/xvmotion/{aid}/commit")
    async def commit(who: Peer, aid: str, body: dict[str, Any]) -> dict[str, Any]:
        return await vc.commit_incoming(who, aid, body)

    @app.post("/api/testbed/xvmotion/{aid}/abort")
    async def abort(who: Peer, aid: str) -> dict[str, Any]:
        return await vc.abort_incoming(who, aid)

    return app
