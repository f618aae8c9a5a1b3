"""A lab described apart from building it (Mininet's Topo idea).

The topology holds names and options only: sites, their vCenter and hosts,
datastores, port groups and the site-to-site link. It is validated once into
frozen models; ``addressing`` derives every address from 198.18.0.0/15.

Address plan (site index s = 0, 1, ...; host index h = 1, 2, ...):

    management   198.18.s.0/24        gateway .1, vCenter .2, host h at .(10+h)
    vMotion      198.18.(16+s).0/24   gateway .1, host h at .(10+h)
    site transit 198.18.254.0/24      site router s at .(1+s)
    VM network   198.19.0.0/16        stretched L2 across sites; observer .0.2,
                                      VMs from 198.19.1.1 up
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from testbed import yamlmodel
from testbed.errors import InputError
from testbed.units import parse_duration_us, parse_ppm, parse_rate_bytes, parse_size

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,14}$")
LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")

LAB_SUPERNET = ipaddress.ip_network("198.18.0.0/15")
VM_NETWORK = ipaddress.ip_network("198.19.0.0/16")
OBSERVER_IP = ipaddress.ip_address("198.19.0.2")
OBSERVER_PORT = 7000
FIRST_VM_IP = ipaddress.ip_address("198.19.1.1")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(f"name {value!r} must be 1-15 characters: lowercase letters, "
                         "digits and '-', starting with a letter")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


class DatastoreSpec(_Frozen):
    name: Name
    capacity_bytes: int = Field(default=16 * 1024**3, gt=0)

    @field_validator("capacity_bytes", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        return parse_size(v, what="datastore capacity") if isinstance(v, str) else v



class HostSpec(_Frozen):
    name: Name
    # netns: a network namespace on this machine; nested: an L1 VM booted from the host image through
    # libvirt (testbed.hosts.nested), its guests running inside it
    kind: Literal["netns", "nested"] = "netns"
    datastores: tuple[DatastoreSpec, ...] = ()
    license: str = "enterprise-plus"     # what the host reports; the vCenter may assign another
    root_password: str | None = None     # None: a random one, kept in the host's directory (0600)
    machine_types: tuple[str, ...] | None = None   # offer only these QEMU machine types (an older host)
    # TCP socket buffer ceiling (tcp_rmem/tcp_wmem max) in the host's namespace: "auto" sizes it to twice
    # the link's bandwidth-delay product (never below the kernel's), "kernel" leaves it alone, or a size.
    tcp_buffers: str = "auto"
    l1_memory_mib: int = Field(default=2048, ge=512, le=65536)   # nested: the L1 VM's memory
    l1_vcpus: int = Field(default=2, ge=1, le=16)                 # nested: the L1 VM's vCPUs

    @field_validator("tcp_buffers")
    @classmethod
    def _tcp_buffers(cls, v: str) -> str:
        if v not in ("auto", "kernel"):
            parse_size(v, what="tcp_buffers")
        return v



class VCenterSpec(_Frozen):
    """A vCenter. Two vCenters with the same ``sso_domain`` are in enhanced linked mode."""

    name: Name
    sso_domain: str = Field(default="vsphere.local", pattern=r"^[a-z0-9][a-z0-9.-]{0,62}$")
    session_ttl_s: int = Field(default=3600, ge=5, le=7 * 86400)



class SiteSpec(_Frozen):
    name: Name
    vcenter: VCenterSpec
    hosts: tuple[HostSpec, ...] = Field(min_length=1, max_length=50)



class PortGroupSpec(_Frozen):
    """A VM network. Each port group is its own L2 segment (its own bridge), stretched across sites."""

    name: str = Field(min_length=1, max_length=64)


class LinkSpec(_Frozen):
    """The site-to-site link. ``bandwidth_bps`` is in bytes per second; None = unlimited.

    ``delay_us`` is one-way (each direction); YAML may give ``rtt: 100ms`` or
    ``delay: 50ms`` instead, and ``jitter: 1ms``, ``loss: 0.1%`` (per direction).
    """

    bandwidth_bps: int | None = Field(default=None, gt=0)
    mtu: int = Field(default=1500, ge=1280, le=9000)
    delay_us: int = Field(default=0, ge=0, le=10_000_000)
    jitter_us: int = Field(default=0, ge=0, le=10_000_000)
    loss_ppm: int = Field(default=0, ge=0, le=1_000_000)

    @model_validator(mode="before")
    @classmethod
    def _people_units(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "rtt" in data and "delay" in data:
            raise ValueError("give either rtt or delay (one-way), not both")
        if "rtt" in data:
            data["delay_us"] = parse_duration_us(data.pop("rtt"), what="link rtt") // 2
        if "delay" in data:
            data["delay_us"] = parse_duration_us(data.pop("delay"), what="link delay")
        if "jitter" in data:
            data["jitter_us"] = parse_duration_us(data.pop("jitter"), what="link jitter")
        if "loss" in data:
            data["loss_ppm"] = parse_ppm(data.pop("loss"), what="link loss")
        if "bandwidth" in data:
            data["bandwidth_bps"] = data.pop("bandwidth")
        return data

    @field_validator("bandwidth_bps", mode="before")
    @classmethod
    def _rate(cls, v: object) -> object:
        return parse_rate_bytes(v, what="link bandwidth") if isinstance(v, str) else v


class Topology(_Frozen):
    name: str = "tb"
    sites: tuple[SiteSpec, ...] = Field(min_length=1, max_length=8)
    port_groups: tuple[PortGroupSpec, ...] = (PortGroupSpec(name="VM Network"),)
    link: LinkSpec = LinkSpec()

    @field_validator("name")
    @classmethod
    def _labname(cls, v: str) -> str:
        if not LAB_NAME_RE.fullmatch(v):
            raise ValueError(f"lab name {v!r} must be 1-8 lowercase letters or digits, "
                             "starting with a letter (it prefixes namespace names)")
        return v

    @model_validator(mode="after")
    def _unique(self) -> Topology:
        seen: dict[str, str] = {}
        for s in self.sites:
            for what, name in [("site", s.name), ("vCenter", s.vcenter.name)] + [
                    ("host", h.name) for h in s.hosts]:
                if name in seen:
                    raise ValueError(f"name {name!r} is used twice ({seen[name]} and {what}); "
                                     "site, vCenter and host names must be unique")
                seen[name] = what
        pgs = [p.name for p in self.port_groups]
        if len(set(pgs)) != len(pgs):
            raise ValueError("port group names must be unique")
        if any(h.kind == "nested" for s in self.sites for h in s.hosts) and len(pgs) > 10:
            raise ValueError("a lab with nested hosts has at most 10 port groups (one NIC per port group "
                             "on each L1 VM, named in 15 characters)")
        if not pgs:
            raise ValueError("at least one port group is needed")
        return self

    # --- lookups -------------------------------------------------------
    def hosts(self) -> list[tuple[int, SiteSpec, int, HostSpec]]:
        """(site index, site, host index from 1, host) for every host."""
        return [(si, s, hi, h) for si, s in enumerate(self.sites)
                for hi, h in enumerate(s.hosts, start=1)]

    def host(self, name: str) -> tuple[int, SiteSpec, int, HostSpec]:
        for entry in self.hosts():
            if entry[3].name == name:
                return entry
        known = ", ".join(h.name for *_, h in self.hosts())
        from testbed.errors import NotFound
        raise NotFound(f"host {name!r} is not in lab {self.name!r}", hint=f"hosts are: {known}")

    def port_group(self, name: str) -> PortGroupSpec:
        for pg in self.port_groups:
            if pg.name == name:
                return pg
        from testbed.errors import NotFound
        raise NotFound(f"port group {name!r} does not exist in lab {self.name!r}",
                       hint="port groups are: " + ", ".join(p.name for p in self.port_groups))


def datastores_of(host: HostSpec) -> tuple[DatastoreSpec, ...]:
    """A host without datastores in the topology gets one local datastore."""
    return host.datastores or (DatastoreSpec(name=f"ds-{host.name}"[:15]),)


def default_topology(name: str = "tb") -> Topology:
    """Two sites, each with its own vCenter and two hosts."""
    def site(letter: str) -> SiteSpec:
        return SiteSpec(
            name=f"site-{letter}",
            vcenter=VCenterSpec(name=f"vc-{letter}", sso_domain=f"vsphere-{letter}.local"),
            hosts=tuple(HostSpec(name=f"esx-{letter}{i}") for i in (1, 2)),
        )
    return Topology(name=name, sites=(site("a"), site("b")))


def load_topology(path: Path | str) -> Topology:
    """Read a YAML topology file; errors name the file and the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f"cannot read topology file {path}: {err.strerror}") from err
    return yamlmodel.parse(text, Topology, str(path), "topology file", needs="'sites'",
                           hint="fix the fields above; `testbed lab up` without --topology uses the default "
                                "two-site lab")


# --- addressing -----------------------------------------------------------

class HostAddresses(_Frozen):
    mgmt: str            # 198.18.s.(10+h)/24
    mgmt_gateway: str
    vmotion: str         # 198.18.(16+s).(10+h)/24
    vmotion_gateway: str


def host_addresses(site_index: int, host_index: int) -> HostAddresses:
    return HostAddresses(
        mgmt=f"198.18.{site_index}.{10 + host_index}/24",
        mgmt_gateway=f"198.18.{site_index}.1",
        vmotion=f"198.18.{16 + site_index}.{10 + host_index}/24",
        vmotion_gateway=f"198.18.{16 + site_index}.1",
    )


def fqdn(t: Topology, node: str) -> str:
    """A lab node's DNS name, resolvable inside the lab's namespaces: ``esx-a1.<lab>.test``."""
    return f"{node}.{t.name}.test"


def vcenter_address(site_index: int) -> str:
    return f"198.18.{site_index}.2/24"


def site_router_addresses(site_index: int) -> dict[str, str]:
    return {
        "mgmt": f"198.18.{site_index}.1/24",
        "vmotion": f"198.18.{16 + site_index}.1/24",
        "transit": f"198.18.254.{1 + site_index}/24",
    }


def vm_address(index: int) -> str:
    """The index-th VM address (0-based) on the stretched VM network, as a /16."""
    ip = FIRST_VM_IP + index
    if ip not in VM_NETWORK or ip == VM_NETWORK.broadcast_address:
        raise InputError("the VM network 198.19.0.0/16 has no free address left")
    return f"{ip}/{VM_NETWORK.prefixlen}"
