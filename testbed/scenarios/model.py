"""The scenario format: typed, frozen models, validated once (``load.load_scenario``).

A scenario names its lab (the default two-site lab, or a topology inline), its
site link, its VMs with their workloads, the steps to run, and what is
expected of each step. Cross-references (a VM on a host that does not exist, a
step moving a VM nobody created, an expectation that cannot be checked) are
errors before anything is built.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from testbed.lab.topology import LinkSpec, Topology, default_topology
from testbed.vcenter.limits import (
    CompletionTimeoutS,
    Converge,
    DiskSize,
    DowntimeLimitMs,
    LibraryItem,
    MemorySize,
    MiB,
    ObjectName,
    Streams,
    VmName,
    Workload,
)

PHASES = ("prechecks", "disk-sync", "memory-precopy", "switchover")
FAULT_PHASES = {"cut-link": ("disk-sync", "memory-precopy"),
                "kill-destination-qemu": ("disk-sync", "memory-precopy"),
                "fill-datastore": ("prechecks",),
                "kill-source-vcenter": ("disk-sync", "memory-precopy")}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VmDef(_Frozen):
    """A VM, with the vCenter API's own limits (testbed.vcenter.limits): a scenario cannot ask what the API refuses."""

    name: VmName
    host: ObjectName
    memory: MemorySize = 256 * MiB      # bytes once validated ("256M" in the file)
    disk: DiskSize | None = 128 * MiB   # none: a diskless VM
    workload: Workload = "idle"         # idle | memory:RATE[@WSS] | disk:RATE, comma-joined
    network: ObjectName | None = None
    encrypted: bool = False
    kernel: LibraryItem | None = None  # the user's own guest (no testbed agent: no heartbeat, no memory check):
    initrd: LibraryItem | None = None  # content library items (`testbed image add FILE`), not paths
    append: str | None = None
    image: LibraryItem | None = None  # or a bootable qcow2/raw image (a library item) as the VM's disk


    @property
    def builtin_guest(self) -> bool:
        return self.kernel is None and self.image is None



class EngineOptions(_Frozen):
    """A move's options, with the limits the API's RelocateOptions checks (the same types)."""

    streams: Streams | None = None
    converge: Converge | None = None
    allow_postcopy: bool | None = None
    downtime_limit_ms: DowntimeLimitMs | None = None
    completion_timeout_s: CompletionTimeoutS | None = None


class Expect(_Frozen):
    """What a move must show. ``result``: how it ends; ``precheck``: the check that must stop it."""

    result: Literal["succeeded", "failed"] = "succeeded"
    precheck: str | None = None
    max_downtime_observed_ms: float | None = Field(default=None, gt=0)
    max_downtime_reported_ms: float | None = Field(default=None, gt=0)
    integrity: bool = True
    max_total_s: float | None = Field(default=None, gt=0)
    rolled_back: bool | None = None     # failed moves: the VM runs where it was
    throttled: bool | None = None       # the convergence controller had to slow the guest

    @model_validator(mode="after")
    def _checkable(self) -> Expect:
        if self.result == "failed" and (self.max_downtime_observed_ms or self.max_downtime_reported_ms):
            raise ValueError("a move expected to fail has no downtime to check: drop max_downtime_*")
        if self.precheck and self.result != "failed":
            raise ValueError("expecting a precheck to stop the move needs result: failed")
        return self


class Move(_Frozen):
    vm: str
    to_host: str
    to_datastore: str | None = None
    to_network: str | None = None
    options: EngineOptions = EngineOptions()
    expect: Expect | None = None


class Evacuate(_Frozen):
    """Move every VM of ``hosts`` (as the scenario made them) to ``to_hosts``, round robin, under an optional
    deadline for the whole evacuation."""

    hosts: tuple[str, ...] = Field(min_length=1)
    to_hosts: tuple[str, ...] = Field(min_length=1)
    concurrency: int = Field(default=1, ge=1, le=8)
    deadline_s: float | None = Field(default=None, gt=0)
    options: EngineOptions = EngineOptions()
    expect: Expect | None = None


class Fault(_Frozen):
    """Inject ``kind`` when ``move`` reaches phase ``at``; the move must roll back cleanly."""

    kind: Literal["cut-link", "kill-destination-qemu", "fill-datastore", "kill-source-vcenter"]
    at: str
    move: Move

    @model_validator(mode="after")
    def _phase(self) -> Fault:
        if self.at not in FAULT_PHASES[self.kind]:
            raise ValueError(f"fault {self.kind} can be injected at: {', '.join(FAULT_PHASES[self.kind])} "
                             f"(not {self.at!r})")
        return self


class Balance(_Frozen):
    """Move the ``count`` busiest VMs (highest dirty rate the guests report) off ``from_vcenter``."""

    from_vcenter: str
    to_hosts: tuple[str, ...] = Field(min_length=1)
    count: int = Field(default=1, ge=1)
    options: EngineOptions = EngineOptions()
    expect: Expect | None = None


class Reach(_Frozen):
    """From port group ``network`` (the observer's leg there), ping the VM: must it answer?"""

    vm: str
    network: str
    reachable: bool


class Link(_Frozen):
    bandwidth: str | None = None         # e.g. 100MiB/s, or "off"
    cut: bool | None = None              # true: partition the sites; false: restore


STEP_KINDS = ("relocate", "evacuate", "balance", "fault", "link", "wait", "set_license", "reach")


class Step(_Frozen):
    """Exactly one of the actions, plus an optional label."""

    label: str | None = None
    relocate: Move | None = None
    evacuate: Evacuate | None = None
    balance: Balance | None = None
    fault: Fault | None = None
    link: Link | None = None
    wait: float | None = Field(default=None, ge=0, le=3600)
    set_license: dict[str, str] | None = None     # host -> edition
    reach: Reach | None = None

    @model_validator(mode="after")
    def _one(self) -> Step:
        given = [k for k in STEP_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a step is exactly one of: {', '.join(STEP_KINDS)} "
                             f"(got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STEP_KINDS if getattr(self, k) is not None)


class Scenario(_Frozen):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,40}$")
    description: str = ""
    topology: Literal["default"] | Topology = "default"
    link: LinkSpec | None = None
    vms: tuple[VmDef, ...] = Field(min_length=1)
    steps: tuple[Step, ...] = Field(min_length=1)
    expect: Expect = Expect()

    def lab_topology(self, lab: str) -> Topology:
        t = default_topology(lab) if self.topology == "default" else self.topology.model_copy(update={"name": lab})
        if self.link is not None:
            t = t.model_copy(update={"link": self.link})
        return t

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        t = self.lab_topology("check")
        hosts = {h.name: (s.name, h) for s in t.sites for h in s.hosts}
        pgs = {p.name for p in t.port_groups}
        names = [v.name for v in self.vms]
        if len(set(names)) != len(names):
            raise ValueError("VM names must be unique")
        for i, v in enumerate(self.vms):
            if v.host not in hosts:
                raise ValueError(f"vms.{i}.host: VM {v.name} is on host {v.host!r}, which is not in the topology "
                                 f"(hosts: {', '.join(hosts)})")
            if v.network and v.network not in pgs:
                raise ValueError(f"vms.{i}.network: port group {v.network!r} is not in the topology")
            if v.disk is None and v.encrypted:
                raise ValueError(f"vms.{i}.encrypted: an encrypted VM needs a disk")
            if v.kernel and v.image:
                raise ValueError(f"vms.{i}.image: give either kernel (+ initrd) or image, not both")
            if not v.builtin_guest and v.workload != "idle":
                raise ValueError(f"vms.{i}.workload: a workload needs the built-in guest (its agent runs it)")
        for i, st in enumerate(self.steps):
            moves: list[tuple[str, Any]] = []
            if st.relocate:
                moves.append(("relocate", st.relocate))
            if st.fault:
                moves.append(("fault.move", st.fault.move))
            for where, m in moves:
                if m.vm not in names:
                    raise ValueError(f"steps.{i}.{where}.vm: VM {m.vm!r} is not one of the scenario's VMs "
                                     f"({', '.join(names)})")
                if m.to_host not in hosts:
                    raise ValueError(f"steps.{i}.{where}.to_host: host {m.to_host!r} is not in the topology")
                if m.to_network and m.to_network not in pgs and not (m.expect and m.expect.precheck):
                    raise ValueError(f"steps.{i}.{where}.to_network: port group {m.to_network!r} is not in the "
                                     "topology")
            if st.evacuate:
                for h in (*st.evacuate.hosts, *st.evacuate.to_hosts):
                    if h not in hosts:
                        raise ValueError(f"steps.{i}.evacuate: host {h!r} is not in the topology")
            if st.balance:
                vcs = {site.vcenter.name for site in t.sites}
                if st.balance.from_vcenter not in vcs:
                    raise ValueError(f"steps.{i}.balance.from_vcenter: {st.balance.from_vcenter!r} is not a vCenter "
                                     f"of the topology ({', '.join(sorted(vcs))})")
                for h in st.balance.to_hosts:
                    if h not in hosts:
                        raise ValueError(f"steps.{i}.balance.to_hosts: host {h!r} is not in the topology")
            if st.reach:
                if st.reach.vm not in names:
                    raise ValueError(f"steps.{i}.reach.vm: VM {st.reach.vm!r} is not one of the scenario's VMs")
                if st.reach.network not in pgs:
                    raise ValueError(f"steps.{i}.reach.network: port group {st.reach.network!r} is not in the "
                                     "topology")
            if st.set_license:
                for h in st.set_license:
                    if h not in hosts:
                        raise ValueError(f"steps.{i}.set_license: host {h!r} is not in the topology")
        return self

