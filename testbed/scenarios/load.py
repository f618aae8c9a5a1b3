"""Reading a scenario file: YAML into the typed models, with errors that point at the line.

The file is composed into YAML nodes first (they carry line numbers), then
validated; each validation error's location (``steps.2.relocate.to_host``) is
walked through the nodes to the line it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from testbed.errors import InputError
from testbed.scenarios.model import Scenario

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios"


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
    """Cross-reference errors name their place in the message: 'steps.2.relocate: ...'."""
    head = msg.split(":", 1)[0].strip()
    if " " in head or "." not in head:
        return ()
    return tuple(int(p) if p.isdigit() else p for p in head.split("."))


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(f"scenario {source} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise InputError(f"scenario {source} must be a mapping with at least name, vms and steps")
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("function-after", "Topology")))
            msg = e["msg"].removeprefix("Value error, ")
            if not loc:
                loc = _loc_from_message(msg)
                if loc:
                    msg = msg.split(":", 1)[1].strip()
            where = ".".join(str(p) for p in loc) or "(top level)"
            line = _line(node, loc)
            lines.append(f"  {source}:{line}: {where}: {msg}" if line else f"  {source}: {where}: {msg}")
        raise InputError(f"scenario {source} is invalid:\n" + "\n".join(lines),
                         hint="fix the fields above; the format is in docs/scenarios.md") from err


def load_scenario(path: Path | str) -> Scenario:
    p = Path(path)
    if not p.exists() and (SCENARIO_DIR / f"{p.name}.yaml").exists():
        p = SCENARIO_DIR / f"{p.name}.yaml"
    try:
        text = p.read_text()
    except OSError as err:
        raise InputError(f"cannot read scenario {p}: {err.strerror}",
                         hint="`testbed scenario list` shows the shipped scenarios") from err
    return parse_scenario(text, str(p))


def shipped() -> list[Path]:
    return sorted(SCENARIO_DIR.glob("*.yaml"))
