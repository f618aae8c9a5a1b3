"""The one VM-name rule, at the bottom of the house: the CLI, the API, scenarios, specs, every host agent
method that takes a name, and the heartbeat observer (a name a guest claims) all check it here."""

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
