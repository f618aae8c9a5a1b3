"""What the REST API answers, as models: the OpenAPI schema documents each body, the API's fuzz test checks every
answer against it (tests/unit/test_vcenter_api_fuzz.py). Fields are the ones clients read; a model keeps any
other field the service adds (``extra="allow"``), so a new field is not dropped, and an old client still reads."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class WhoAmI(_Out):
    user: str
    domain: str
    created_time: float
    expires_time: float
    vcenter: str


class Datacenter(_Out):
    datacenter: str
    name: str


class Cluster(_Out):
    cluster: str
    name: str
    hosts: list[str]


class HostSummary(_Out):
    host: str
    name: str
    hostname: str | None = None
    address: str
    cluster: str
    connection_state: str
    power_state: str
    license: str
    qemu_version: str | None = None
    accel: str | None = None
    vmotion_address: str | None = None
    ssh_fingerprint: str | None = None
    agent_pid: int | None = None


class HostDetail(HostSummary):
    facts: dict[str, Any]


class Datastore(_Out):
    datastore: str
    name: str
    host: str
    type: str
    capacity: int
    free_space: int


class Network(_Out):
    network: str
    name: str
    type: str
    hosts: list[str]


class VmSummary(_Out):
    vm: str
    name: str
    host: str
    power_state: str
    memory_size_MiB: int
    ip: str | None = None
    workload: str | None = None
    busy: str | None = None


class VmDisk(_Out):
    datastore: str
    file: str
    capacity: int
    encrypted: bool


class VmNic(_Out):
    network: str
    mac_address: str


class VmInfo(VmSummary):
    cpu_count: int
    guest: str
    disks: list[VmDisk]
    nics: list[VmNic]
    machine: str
    cpu_model: str
    history: list[dict[str, Any]]


class Console(_Out):
    vm: str
    host: str
    text: str


class TaskRef(_Out):
    task: str


class TaskView(_Out):
    id: str
    operation: str
    target: str
    status: str
    description: str
    user: str | None = None
    vcenter: str
    start_time: float
    end_time: float | None = None
    progress: dict[str, Any] | None = None
    prechecks: list[dict[str, Any]]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    notes: list[str]
    verdict: str | None = None
    timeline: list[dict[str, Any]]
    # a relocate held at an engine breakpoint: {"checkpoint", "since" (time.time()), "incoming" (the destination's
    # migration URI and NBD export, {} before they exist)}; None when not held
    held_at: dict[str, Any] | None = None
    holds: list[dict[str, Any]] = []     # each breakpoint it was held at: checkpoint, since, held_s, released_by


class Released(_Out):
    released: str      # the checkpoint the task was held at


class Event(_Out):
    id: int
    t: float
    kind: str
    vm: str | None = None
    host: str | None = None
    task: str | None = None
    message: str
    data: dict[str, Any]


class SourceCopy(_Out):
    vm: str
    host: str
    task: str
    kept_s: float
    moved_to: str | None = None
    destination_vcenter: str | None = None
    why: str | None = None


class Discarded(_Out):
    vm: str
    host: str
    removed: list[str]


class ReconcileReport(_Out):
    vcenter: str
    agree: list[str]
    fixed: list[str]
    problems: list[str]
    unreachable_hosts: list[str]


class About(_Out):
    name: str
    fqdn: str
    url: str
    sso_domain: str
    thumbprint: str
    certificate: str
    datacenter: str
    version: str
    started_s: float


class Trust(_Out):
    name: str
    url: str
    thumbprint: str
    added_s: float
    how: str
