"""The topology is validated once, with errors that name the file and the field."""

from pathlib import Path

import pytest

from testbed.errors import InputError, NotFound
from testbed.lab import topology as topo


def test_default_topology_is_two_sites_of_two_hosts() -> None:
    t = topo.default_topology()
    assert [s.name for s in t.sites] == ["site-a", "site-b"]
    assert [h.name for *_, h in t.hosts()] == ["esx-a1", "esx-a2", "esx-b1", "esx-b2"]
    assert {s.vcenter.sso_domain for s in t.sites} == {"vsphere-a.local", "vsphere-b.local"}


def test_every_address_is_inside_the_lab_range_and_unique() -> None:
    import ipaddress
    t = topo.default_topology()
    seen = set()
    for si, _, hi, _ in t.hosts():
        a = topo.host_addresses(si, hi)
        for cidr in (a.mgmt, a.vmotion):
            ip = ipaddress.ip_interface(cidr).ip
            assert ip in topo.LAB_SUPERNET
            assert ip not in seen
            seen.add(ip)
    for si in range(len(t.sites)):
        for cidr in topo.site_router_addresses(si).values():
            assert ipaddress.ip_interface(cidr).ip in topo.LAB_SUPERNET
    assert ipaddress.ip_interface(topo.vm_address(0)).ip in topo.VM_NETWORK
    assert topo.VM_NETWORK.subnet_of(topo.LAB_SUPERNET)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="used twice"):
        topo.Topology.model_validate({"sites": [
            {"name": "a", "vcenter": {"name": "vc"}, "hosts": [{"name": "h1"}, {"name": "h1"}]}]})


def test_malformed_yaml_names_file_and_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("sites:\n  - name: a\n    vcenter: {name: vc}\n    hosts: [{name: H_1}]\n")
    with pytest.raises(InputError) as e:
        topo.load_topology(f)
    assert str(f) in str(e.value)
    assert "sites.0.hosts.0.name" in str(e.value)


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("sites: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        topo.load_topology(f)
    f.write_text("- just a list\n")
    with pytest.raises(InputError, match="mapping"):
        topo.load_topology(f)
    with pytest.raises(InputError, match="cannot read"):
        topo.load_topology(tmp_path / "missing.yaml")


def test_link_bandwidth_accepts_units(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text("name: lab2\nsites:\n  - name: a\n    vcenter: {name: vc-a}\n    hosts: [{name: h1}]\n"
                 "link: {bandwidth_bps: 100MiB/s}\n")
    t = topo.load_topology(f)
    assert t.link.bandwidth_bps == 100 * 1024**2
    assert t.name == "lab2"


def test_unknown_host_lists_the_known_ones() -> None:
    with pytest.raises(NotFound, match="esx-a1"):
        topo.default_topology().host("esx-zz")


def test_lab_name_must_fit_interface_prefixes() -> None:
    with pytest.raises(ValueError, match="lab name"):
        topo.default_topology("Much-Too-Long-Name")


@pytest.mark.parametrize("name", ["h1\n", "h1/x", "../h1"])
def test_a_name_with_a_trailing_newline_or_a_path_is_refused(name: str) -> None:
    """The rules match whole names: ``^...$`` with ``re.match`` let "h1\\n" through."""
    with pytest.raises(ValueError):
        topo.Topology.model_validate({"sites": [
            {"name": "a", "vcenter": {"name": "vc"}, "hosts": [{"name": name}]}]})
    with pytest.raises(ValueError):
        topo.default_topology("tb\n")


@pytest.mark.parametrize("name", ["web01\n", "/", "../x", "Web01", "-web", "a" * 32])
def test_the_one_vm_name_rule(name: str) -> None:
    from pydantic import ValidationError

    from testbed.qemu.spec import VmSpec, check_vm_name, vm_name_ok
    assert not vm_name_ok(name)
    with pytest.raises(InputError, match="is not allowed"):
        check_vm_name(name)
    spec = {"memory_bytes": 256 << 20, "boot": {"kernel": "/k", "initrd": "/i"}}
    with pytest.raises(ValidationError, match="must be 1-31 lowercase letters"):
        VmSpec.model_validate({"name": name, **spec})
    assert VmSpec.model_validate({"name": "web01", **spec}).name == "web01"
    assert vm_name_ok("web01") and vm_name_ok("a" * 31)


def test_a_spec_moved_to_a_datastore_keeps_everything_else() -> None:
    from testbed.qemu.spec import VmSpec
    spec = VmSpec.model_validate({"name": "web01", "memory_bytes": 256 << 20, "boot": {"kernel": "/k", "initrd": "/i"},
                                  "disks": [{"datastore": "ds-a", "file": "web01.qcow2", "size_bytes": 1 << 30},
                                            {"datastore": "ds-a", "file": "web01-1.qcow2", "size_bytes": 1 << 20}]})
    moved = spec.moved_to("ds-b")
    assert [d.datastore for d in moved.disks] == ["ds-b", "ds-b"]
    assert [d.file for d in moved.disks] == ["web01.qcow2", "web01-1.qcow2"] and moved.name == spec.name
    assert spec.disks[0].datastore == "ds-a" and spec.moved_to(None) is spec
