"""Every command a message tells the user to run is one the CLI or the Makefile takes as printed.

The hints are collected from the package's source (string literals and f-strings, placeholders
filled with sample values), so a new hint is checked the day it is written.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from testbed.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "testbed"
COMMAND = re.compile(r"`((?:testbed|make) [^`]+)`")
# Words a hint uses for "put yours here"; filled like a user would.
PLACEHOLDER = re.compile(r"\b(NAME|HOST|VM|TASK|LAB|FILE)\b")


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "x1" for v in node.values)
    return None


def _hints() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes = list(ast.walk(tree))
        skip = {id(n.body[0].value) for n in nodes          # docstrings describe, they do not advise
                if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and n.body and isinstance(n.body[0], ast.Expr)}
        skip |= {id(v) for n in nodes if isinstance(n, ast.JoinedStr) for v in n.values}  # read as one f-string
        for node in nodes:
            text = None if id(node) in skip else _text(node)
            for m in COMMAND.finditer(text or ""):
                found.append((f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}", m.group(1)))
    return found


HINTS = _hints()
TARGETS = set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def test_the_package_has_hints_to_check() -> None:
    assert len(HINTS) > 30, HINTS        # the collector finds them (a broken regex would pass all)


@pytest.mark.parametrize(("where", "command"), HINTS, ids=[f"{w} {c}" for w, c in HINTS])
def test_hint_runs_as_printed(where: str, command: str) -> None:
    words = PLACEHOLDER.sub("x1", command).split()
    if words[0] == "make":
        missing = [t for t in words[1:] if not t.startswith("-") and t not in TARGETS]
        assert not missing, f"{where}: `{command}` names no Makefile target {missing}"
        return
    try:
        build_parser().parse_args(words[1:])
    except SystemExit as err:
        pytest.fail(f"{where}: `{command}` is not a command the CLI takes (exit {err.code})")
