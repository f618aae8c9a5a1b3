"""``testbed image``: the vCenters' content libraries (part of ``testbed``'s command line).

    testbed image add FILE [--name NAME] [--kind kernel|initrd|disk] [--vcenter VC]
    testbed image list [--vcenter VC] [--json] | image remove NAME [--vcenter VC]

An item is copied into each vCenter's library (every vCenter of the lab, or --vcenter's) over its API; VMs
name items (``testbed vm create --kernel ITEM --initrd ITEM`` or ``--image ITEM``), never host paths.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed.errors import NotFound
from testbed.names import check_item_name

out = Console()


def _targets(a: argparse.Namespace) -> list[str]:
    from testbed.cli_vcenter import _vcenters
    return [a.vcenter] if a.vcenter else _vcenters(a.lab)


def _client(a: argparse.Namespace, vc: str) -> Any:
    from testbed.cli_vcenter import _client as client
    return client(a, vc)


def image_add(a: argparse.Namespace) -> int:
    f = Path(a.file)
    if not f.is_file():
        raise NotFound(f"image file {a.file} does not exist (or is not a regular file)")
    name = check_item_name(a.name or f.name.lower())
    params = {"name": name, **({"kind": a.kind} if a.kind else {})}
    for vc in _targets(a):
        with _client(a, vc) as c:
            item = c.post("/api/testbed/images", params=params, upload=f)
        out.print(f"{vc}: item [bold]{item['name']}[/] added ({item['kind']}, {item['format']}, "
                  f"{item['size_bytes']} bytes, sha256 {item['sha256'][:16]}...)")
    return 0


def image_list(a: argparse.Namespace) -> int:
    rows = []
    for vc in _targets(a):
        with _client(a, vc) as c:
            rows += [{**i, "vcenter": vc} for i in c.get("/api/testbed/images")]
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table("item", "vCenter", "kind", "format", "size", "sha256", "added")
    for i in rows:
        table.add_row(i["name"], i["vcenter"], i["kind"], i["format"], str(i["size_bytes"]), i["sha256"][:16],
                      time.strftime("%Y-%m-%d %H:%M", time.gmtime(i["added_s"])))
    out.print(table)
    return 0


def image_remove(a: argparse.Namespace) -> int:
    check_item_name(a.name)
    removed = []
    for vc in _targets(a):
        with _client(a, vc) as c:
            try:
                c.delete(f"/api/testbed/images/{a.name}")
                removed.append(vc)
            except NotFound:
                if a.vcenter:
                    raise
    if not removed:
        raise NotFound(f"no vCenter of lab {a.lab} has content library item {a.name!r}",
                       hint="`testbed image list` shows the items")
    out.print(f"item [bold]{a.name}[/] removed from {', '.join(removed)}")
    return 0


def register(sub: Any) -> Any:
    """The ``image`` commands; returns their subparsers (the caller adds --user/--password)."""
    img = sub.add_parser("image", help="the vCenters' content libraries: kernels, initrds and disk images for VMs"
                         ).add_subparsers(dest="sub", required=True)
    s = img.add_parser("add", help="copy a kernel, initrd or qcow2/raw disk image into the content library "
                                   "(of every vCenter of the lab, or --vcenter's)")
    s.add_argument("file")
    s.add_argument("--name", help="the item's name (default: the file's name, lowercased)")
    s.add_argument("--kind", choices=("kernel", "initrd", "disk"), help="default: read from the file")
    s.add_argument("--vcenter")
    s.set_defaults(fn=image_add)
    s = img.add_parser("list", help="the items of the content libraries")
    s.add_argument("--vcenter")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=image_list)
    s = img.add_parser("remove", help="remove an item (not while a VM boots from it)")
    s.add_argument("name")
    s.add_argument("--vcenter")
    s.set_defaults(fn=image_remove)
    return img
