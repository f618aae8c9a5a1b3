"""YAML files read into pydantic models, with errors that point at the line and the field.

The text is composed into YAML nodes (they carry line numbers) and validated;
each error's location (``steps.2.relocate.to_host``) is walked through the
nodes to the line it came from. A cross-reference error raised by a model
validator names its place at the start of its message (``vms.0.host: ...``).
"""

from __future__ import annotations

from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from testbed.errors import InputError

M = TypeVar("M", bound=BaseModel)


def _line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest node on ``loc`` that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None)
            if nxt is None:
                break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _loc_from_message(msg: str) -> tuple[Any, ...]:
    head = msg.split(":", 1)[0].strip()
    if " " in head or "." not in head:
        return ()
    return tuple(int(p) if p.isdigit() else p for p in head.split("."))


def parse(text: str, model: type[M], source: str, what: str, *, needs: str, hint: str) -> M:
    """``what`` names the kind of file in messages ("scenario", "topology file"); ``needs`` says what
    the top-level mapping must hold; ``hint`` is what to do about invalid fields."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(f"{what} {source} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise InputError(f"{what} {source} must hold a mapping with at least {needs}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-")
                                                                            or p[:1].isupper())))
            msg = e["msg"].removeprefix("Value error, ")
            if not loc:
                loc = _loc_from_message(msg)
                if loc:
                    msg = msg.split(":", 1)[1].strip()
            where = ".".join(str(p) for p in loc) or "(top level)"
            line = _line(node, loc)
            lines.append(f"  {source}:{line}: {where}: {msg}" if line else f"  {source}: {where}: {msg}")
        raise InputError(f"{what} {source} is invalid:\n" + "\n".join(lines), hint=hint) from err
