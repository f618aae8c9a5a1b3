"""The one rule for each name that becomes a path or an identity, at the bottom of the house: VM names (the
CLI, the API, scenarios, specs, every host agent method that takes a name, the heartbeat observer: a name a
guest claims), disk file and datastore names (every agent method that takes them), content library item
names (the library, VM create and scenarios), and ``inside``, the check that a path built from a name stays
in its directory."""

from __future__ import annotations

import re
from pathlib import Path

from testbed.errors import InputError

VM_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")      # whole names only (fullmatch: no trailing newline)
VM_NAME_RULE = "1-31 lowercase letters, digits and '-', starting with a letter"


def vm_name_ok(name: object) -> bool:
    return isinstance(name, str) and VM_NAME_RE.fullmatch(name) is not None


def check_vm_name(name: object) -> str:
    """``name`` if it is a VM name, else ``InputError`` saying the rule."""
    if not vm_name_ok(name):
        raise InputError(f"VM name {name!r} is not allowed", hint=f"use {VM_NAME_RULE}")
    return str(name)


# A disk is a file directly inside its datastore's directory: no '/', never '.' or '..' (it starts with a letter
# or digit), nothing hidden (the datastore keeps its own dot-files beside the disks).
DISK_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DISK_FILE_RULE = "1-128 letters, digits, '.', '_' and '-', starting with a letter or digit"
# A datastore's name (the topology's object-name rule, lab/topology.py); the agent also looks it up.
DATASTORE_RE = re.compile(r"[a-z][a-z0-9-]{0,14}")
DATASTORE_RULE = "1-15 lowercase letters, digits and '-', starting with a letter"


def check_disk_file(file: object) -> str:
    """``file`` if it is a disk file name, else ``InputError`` saying the rule."""
    if not (isinstance(file, str) and DISK_FILE_RE.fullmatch(file)):
        raise InputError(f"disk file name {file!r} is not allowed", hint=f"use {DISK_FILE_RULE}")
    return file


def check_datastore_name(name: object) -> str:
    """``name`` if it is a datastore name, else ``InputError`` saying the rule."""
    if not (isinstance(name, str) and DATASTORE_RE.fullmatch(name)):
        raise InputError(f"datastore name {name!r} is not allowed", hint=f"use {DATASTORE_RULE}")
    return name


def inside(base: Path, name: str, what: str) -> Path:
    """``base / name`` resolved, if it stays inside ``base`` (resolved too) as a direct child: the last check
    before a path built from a name is opened, written or removed (a symlink planted in ``base`` that points
    out of it is refused as well)."""
    root = base.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise InputError(f"{what} {name!r} would leave its directory {root} (it resolves to {path})",
                         hint="names are single path components inside their directory")
    return path


# A content library item's name (a VM's kernel, initrd or disk image): a file name inside the library, never a path.
ITEM_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
ITEM_NAME_RULE = "1-63 lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, no '..'"


def item_name_ok(name: object) -> bool:
    return isinstance(name, str) and ITEM_NAME_RE.fullmatch(name) is not None and ".." not in name


def check_item_name(name: object) -> str:
    """``name`` if it is a content library item name, else ``InputError`` saying the rule."""
    if not item_name_ok(name):
        raise InputError(f"content library item name {name!r} is not allowed",
                         hint=f"use {ITEM_NAME_RULE}; `testbed image list` shows the items")
    return str(name)
