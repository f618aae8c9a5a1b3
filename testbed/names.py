"""The name rules, at the bottom of the house. VM names: the CLI, the API, scenarios, specs, every host agent
method that takes a name, and the heartbeat observer (a name a guest claims) check them here; content library
item names: the library, VM create and scenarios."""

from __future__ import annotations

import re

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
