"""Reading a scenario file: YAML into the typed models, with errors that point at the line
(``testbed.yamlmodel``)."""

from __future__ import annotations

from pathlib import Path

from testbed import yamlmodel
from testbed.errors import InputError
from testbed.scenarios.model import Scenario

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios"


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    return yamlmodel.parse(text, Scenario, source, "scenario", needs="name, vms and steps",
                           hint="fix the fields above; the format is in docs/scenarios.md")


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
