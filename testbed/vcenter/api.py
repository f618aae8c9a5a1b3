"""The vCenter's HTTPS API (FastAPI), shaped after the vSphere Automation REST API.

Every route but ``POST /api/session`` needs a session token in the
``vmware-api-session-id`` header. Errors are JSON in vSphere's shape,
``{"error_type": ..., "messages": [{"default_message": ...}], "hint": ...}``,
with the HTTP status that fits: 400 bad input (malformed JSON and unknown
fields included), 401 no/expired/foreign token, 403 not allowed (an untrusted
peer), 404 unknown object or route, 405 no such method, 409 busy or already there,
503 a host or peer that does not answer or could not do what was asked, 500 a bug
(an incident id; the traceback only in the log): ``api_errors``. Every request
field's rule is in its type (``limits``), every answer's shape in ``views``.

    POST   /api/session                          log in (basic auth) -> token
    GET    /api/session | DELETE /api/session    who am I | log out
    GET    /api/vcenter/datacenter | cluster | datastore | network
    GET    /api/vcenter/host | POST (add) | GET/PATCH/DELETE /api/vcenter/host/{host}
    GET    /api/vcenter/vm | POST (create) | GET/DELETE /api/vcenter/vm/{vm}
    POST   /api/vcenter/vm/{vm}/power?action=start|stop
    POST   /api/vcenter/vm/{vm}?action=relocate  -> {"task": id}
    GET    /api/cis/tasks | /api/cis/tasks/{task}
    POST   /api/cis/tasks/{task}?action=continue   release the breakpoint a relocate is held at (admin)
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
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict, Field, model_validator

from testbed.errors import (
    Forbidden,
    InputError,
    NotFound,
    Unauthorized,
)
from testbed.qemu.spec import VmSpec
from testbed.vcenter import sso, views
from testbed.vcenter.api_errors import ERROR_RESPONSES, install_error_handlers, openapi_schema
from testbed.vcenter.api_errors import error_body as error_body
from testbed.vcenter.api_errors import status_of as status_of
from testbed.vcenter.limits import (
    Bandwidth,
    Breakpoints,
    BreakpointTimeoutS,
    CompletionTimeoutS,
    Converge,
    DiskSize,
    DiskSyncTimeoutS,
    DowntimeLimitMs,
    HostName,
    LibraryItem,
    MemorySize,
    MirrorGranularity,
    MirrorMode,
    ObjectName,
    PostcopyRecoveryTimeoutS,
    SdpsMaxStunPct,
    Secret,
    StallTimeoutS,
    Streams,
    UserName,
    Vcpus,
    VmName,
    Workload,
)
from testbed.vcenter.service import VCenter

log = logging.getLogger("testbed.vcenter.api")


class _In(BaseModel):
    """A request body: unknown fields refused, and no coercion ("1" is not 1, true is not 1): every field's
    rule is in its type (testbed.vcenter.limits), checked before any work."""
    model_config = ConfigDict(extra="forbid", strict=True)


SshFingerprint = Annotated[str, Field(pattern=r"^SHA256:[A-Za-z0-9+/]{43}=?$")]
Edition = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")]


class AddHost(_In):
    hostname: HostName
    user_name: UserName = "root"
    password: Secret
    thumbprint: SshFingerprint | None = None   # the host's SSH key fingerprint (SHA256:...), pinned if given
    cluster: ObjectName | None = None
    license: Edition | None = None


class HostPatch(_In):
    license: Edition


class Placement(_In):
    host: ObjectName
    datastore: ObjectName | None = None
    network: ObjectName | None = None      # the port group the VM's NICs use at the destination


class CreateVm(_In):
    name: VmName
    placement: Placement
    memory: MemorySize = 512 * 2**20
    disk: DiskSize | None = None           # none: a diskless VM
    workload: Workload = "idle"
    cpu_count: Vcpus = 1
    power_on: bool = True
    encrypted: bool = False                # the VM's disk is LUKS-encrypted (cross-vCenter vMotion refuses it)
    kernel: LibraryItem | None = None  # the user's own guest: kernel (+ initrd, append), content library items
    initrd: LibraryItem | None = None
    append: str | None = Field(default=None, max_length=2000)   # the kernel takes 2 KiB on x86
    image: LibraryItem | None = None  # or a bootable disk image (a library item), copied to the datastore



VcenterUrl = Annotated[str, Field(pattern=r"^https://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?/?$")]


class DestinationVcenter(_In):
    url: VcenterUrl
    user_name: UserName | None = None
    password: Secret | None = None
    thumbprint: Annotated[str, Field(pattern=r"^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$")] | None = None


class RelocateOptions(_In):
    """A relocate's engine options, each checked here (a 400 before any work), not in the middle of the move."""
    streams: Streams | None = None
    converge: Converge | None = None       # normalized: "auto" -> "auto-converge"
    allow_postcopy: bool | None = None
    bandwidth: Bandwidth | None = None     # bytes/s, or a rate ("30MiB/s", "240Mbit/s"): bytes/s once validated
    downtime_limit_ms: DowntimeLimitMs | None = None
    completion_timeout_s: CompletionTimeoutS | None = None
    accept_unverified: bool | None = None   # remove the source copy even when a check could not be made
    mirror_mode: MirrorMode | None = None
    mirror_granularity: MirrorGranularity | None = None   # bytes, a power of 2
    stall_timeout_s: StallTimeoutS | None = None           # no migration progress for this long: the move fails
    postcopy_recovery_timeout_s: PostcopyRecoveryTimeoutS | None = None   # a broken post-copy reconnects within
    disk_sync_timeout_s: DiskSyncTimeoutS | None = None   # the disk copy is READY within this, or it rolls back
    sdps_max_stun_pct: SdpsMaxStunPct | None = None       # SDPS's ceiling
    # fault injection and experiments (administrators only): hold the move at these engine checkpoints until
    # POST /api/cis/tasks/{task}?action=continue, each at most breakpoint_timeout_s (default 300)
    breakpoints: Breakpoints | None = None
    breakpoint_timeout_s: BreakpointTimeoutS | None = None


class RelocateSpec(_In):
    placement: Placement
    destination_vcenter: DestinationVcenter | None = None
    options: RelocateOptions = RelocateOptions()


class Relocate(_In):
    spec: RelocateSpec


class TrustRequest(_In):
    name: ObjectName
    url: VcenterUrl
    certificate: Annotated[str, Field(max_length=16384)]
    nonce: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]    # ours, from POST /api/testbed/trust/challenge
    signature: Annotated[str, Field(max_length=2048)]


class IncomingPrecheck(_In):
    vm: dict[str, Any]
    source_facts: dict[str, Any]
    host: ObjectName
    datastore: ObjectName | None = None
    source_names: list[Annotated[str, Field(max_length=253)]] = Field(default=[], max_length=16)


class IncomingVm(BaseModel):
    """The VM a peer vCenter asks to admit: its name, its spec (validated here as the agent will: a bad one is a
    400 at the request, not a failure inside the admission) and what its inventory row carries along."""
    model_config = ConfigDict(extra="forbid")
    name: VmName
    spec: VmSpec
    ip: Annotated[str, Field(max_length=64)] | None = None
    workload: Annotated[str, Field(max_length=200)] = "idle"
    builtin_guest: bool = True
    history: Annotated[list[dict[str, Any]], Field(max_length=1000)] = []

    @model_validator(mode="after")
    def _same_name(self) -> IncomingVm:
        if self.spec.name != self.name:
            raise ValueError(f"the spec is of VM {self.spec.name!r}, not {self.name!r}")
        return self


class Admit(_In):
    vm: IncomingVm
    host: ObjectName
    datastore: ObjectName | None = None
    source_vcenter: ObjectName
    source_task: Annotated[str, Field(max_length=64)] | None = None
    # the source's limit for the move: the ticket's life (clamped there: testbed.vcenter.admission.ticket_ttl_s)
    move_timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)


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


def _admin_of(vc: VCenter, s: sso.Session, what: str = "change the content library") -> None:
    """Administrators only: another user gets a 403 saying what they may not do."""
    row = vc.inv.user(s.user)
    if row is None or row["role"] != "Admin":
        raise Forbidden(f"user {s.user} may not {what} in vCenter {vc.cfg.name}: administrators only",
                        hint=f"log in as an administrator of SSO domain {vc.cfg.sso_domain}")


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
                  openapi_url="/api/openapi.json", responses=ERROR_RESPONSES)
    app.openapi = lambda: openapi_schema(app)     # type: ignore[method-assign]
    app.state.vc = vc

    def _admin(s: sso.Session, what: str = "change the content library") -> None:
        _admin_of(vc, s, what)

    install_error_handlers(app, vc.cfg.name)

    # --- session ------------------------------------------------------------------------
    @app.post("/api/session", status_code=201)
    def login(creds: Basic) -> str:
        if creds is None:
            raise Unauthorized("log in with HTTP basic authentication (user@domain and password)")
        return vc.login(creds.username, creds.password)

    @app.get("/api/session", response_model=views.WhoAmI)
    def whoami(s: Session) -> dict[str, Any]:
        # a linked vCenter asks the issuer of a session this way whether it still holds ("vcenter": the issuer)
        return {"user": s.user, "domain": s.domain, "created_time": s.issued_s, "expires_time": s.expires_s,
                "vcenter": vc.cfg.name, "issuer": s.issuer}

    @app.delete("/api/session", status_code=204)
    def logout(s: Session, token: Annotated[str | None, Header(alias="vmware-api-session-id")] = None) -> None:
        vc.logout(s, token)

    # --- inventory ------------------------------------------------------------------------
    @app.get("/api/vcenter/datacenter", response_model=list[views.Datacenter])
    def datacenters(s: Session) -> list[dict[str, Any]]:
        return [{"datacenter": vc.cfg.datacenter, "name": vc.cfg.datacenter}]

    @app.get("/api/vcenter/cluster", response_model=list[views.Cluster])
    def clusters(s: Session) -> list[dict[str, Any]]:
        names = sorted({h["cluster"] for h in vc.inv.hosts()} | {vc.cfg.cluster})
        return [{"cluster": n, "name": n, "hosts": [h["name"] for h in vc.inv.hosts() if h["cluster"] == n]}
                for n in names]

    @app.get("/api/vcenter/host", response_model=list[views.HostSummary])
    def hosts(s: Session) -> list[dict[str, Any]]:
        return [vc.host_summary(h) for h in vc.inv.hosts()]

    @app.post("/api/vcenter/host", status_code=201, response_model=views.HostSummary)
    async def add_host(s: Session, body: AddHost) -> dict[str, Any]:
        return await vc.add_host(body.hostname, body.user_name, body.password, thumbprint=body.thumbprint,
                                 cluster=body.cluster, license=body.license)

    @app.get("/api/vcenter/host/{host}", response_model=views.HostDetail)
    async def host(s: Session, host: str) -> dict[str, Any]:
        vc.managed(host)
        h = await vc.refresh_host(host)
        return {**vc.host_summary(h), "facts": h["facts"]}

    @app.patch("/api/vcenter/host/{host}", response_model=views.HostSummary)
    def patch_host(s: Session, host: str, body: HostPatch) -> dict[str, Any]:
        return vc.set_license(host, body.license)

    @app.delete("/api/vcenter/host/{host}", status_code=204)
    async def remove_host(s: Session, host: str) -> None:
        await vc.remove_host(host)

    @app.get("/api/vcenter/datastore", response_model=list[views.Datastore])
    def datastores(s: Session, host: str | None = None) -> list[dict[str, Any]]:
        return vc.datastores(host)

    @app.get("/api/vcenter/network", response_model=list[views.Network])
    def networks(s: Session) -> list[dict[str, Any]]:
        return vc.networks()

    # --- VMs --------------------------------------------------------------------------------
    @app.get("/api/vcenter/vm", response_model=list[views.VmSummary])
    async def vms(s: Session) -> list[dict[str, Any]]:
        return await vc.list_vms()

    @app.post("/api/vcenter/vm", status_code=201, response_model=views.VmInfo)
    async def create_vm(s: Session, body: CreateVm) -> dict[str, Any]:
        # memory and disk are bytes here: validated and parsed (testbed.vcenter.limits)
        return await vc.create_vm(body.name, body.placement.host, int(body.memory),
                                  None if body.disk is None else int(body.disk), datastore=body.placement.datastore,
                                  network=body.placement.network, workload=body.workload, vcpus=body.cpu_count,
                                  start=body.power_on, encrypted=body.encrypted, kernel=body.kernel,
                                  initrd=body.initrd, append=body.append, image=body.image, user=s.user)

    @app.get("/api/vcenter/vm/{vm}", response_model=views.VmInfo)
    async def vm(s: Session, vm: str) -> dict[str, Any]:
        return await vc.vm_info(vm)

    @app.get("/api/vcenter/vm/{vm}/console", response_model=views.Console)
    async def console(s: Session, vm: str) -> dict[str, Any]:
        return await vc.console_log(vm)

    @app.delete("/api/vcenter/vm/{vm}", status_code=204)
    async def delete_vm(s: Session, vm: str) -> None:
        await vc.delete_vm(vm, user=s.user)

    @app.post("/api/vcenter/vm/{vm}/power", response_model=views.VmInfo)
    async def power(s: Session, vm: str, action: Annotated[Literal["start", "stop"], Query()]) -> dict[str, Any]:
        return await vc.power(vm, action, user=s.user)

    @app.post("/api/vcenter/vm/{vm}", status_code=202, response_model=views.TaskRef)
    async def vm_action(s: Session, vm: str, action: Annotated[Literal["relocate"], Query()],
                  body: Relocate) -> dict[str, Any]:
        o = body.spec.options
        if o.breakpoints:
            _admin(s, "hold a relocate at engine breakpoints (options.breakpoints)")
        opts: dict[str, Any] = o.model_dump(exclude_none=True, exclude={"bandwidth"})
        if o.bandwidth is not None:
            opts["bandwidth_bps"] = o.bandwidth    # a number of bytes/s once validated
        dest = body.spec.destination_vcenter.model_dump() if body.spec.destination_vcenter else None
        t = vc.start_relocate(vm, body.spec.placement.model_dump(), dest, opts, s.user)
        return {"task": t["id"]}

    # --- tasks and events ---------------------------------------------------------------------
    @app.get("/api/cis/tasks", response_model=list[views.TaskView])
    def tasks(s: Session, status: Annotated[str | None, Query(pattern=r"^(?i:running|succeeded|failed)$")] = None,
              ) -> list[dict[str, Any]]:
        return [vc.task_view(t) for t in vc.inv.tasks(state=status.upper() if status else None)]

    @app.get("/api/cis/tasks/{task}", response_model=views.TaskView)
    def task(s: Session, task: str) -> dict[str, Any]:
        return vc.task_view(vc.task(task))

    @app.post("/api/cis/tasks/{task}", response_model=views.Released)
    async def task_action(s: Session, task: str, action: Annotated[Literal["continue"], Query()]) -> dict[str, Any]:
        # async: on the event loop, where the held move waits (an asyncio.Event is not set from another thread)
        _admin(s, "release a relocate held at a breakpoint")
        return vc.continue_task(task, user=s.user)

    @app.get("/api/testbed/events", response_model=list[views.Event])
    def events(s: Session, vm: Annotated[str | None, Query(max_length=64)] = None,
               since: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0) -> list[dict[str, Any]]:
        return vc.inv.events(vm=vm, since_id=since)

    @app.get("/api/testbed/source-copies", response_model=list[views.SourceCopy])
    def source_copies(s: Session) -> list[dict[str, Any]]:
        return [{k: c[k] for k in ("vm", "host", "task", "kept_s", "moved_to", "destination_vcenter", "why")
                 if k in c} for c in vc.inv.source_copies()]

    @app.delete("/api/testbed/source-copies/{vm}", response_model=views.Discarded)
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

    @app.post("/api/testbed/reconcile", response_model=views.ReconcileReport)
    async def reconcile(s: Session) -> dict[str, Any]:
        return await vc.reconcile()

    @app.get("/api/testbed/about", response_model=views.About)
    def about(s: Session) -> dict[str, Any]:
        return vc.about()

    @app.get("/api/testbed/trust", response_model=list[views.Trust])
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
        return await vc.admit(who, body.model_dump(mode="json"))

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
