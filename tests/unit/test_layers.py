"""Imports run one way (README, "Architecture"): no module imports one of a higher layer. Read from the code's own
import statements, at module level and inside functions alike."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# bottom first; a module belongs to the longest prefix that names it
LAYERS: list[tuple[str, ...]] = [
    ("testbed.errors", "testbed.names", "testbed.paths", "testbed.units", "testbed.yamlmodel", "testbed.daemon"),
    ("testbed.net", "testbed.lab", "testbed.guest"),
    ("testbed.qemu", "testbed.hostd"),
    ("testbed.hosts",),
    ("testbed.labctl",),
    ("testbed.migration",),
    ("testbed.vcenter",),
    ("testbed.ui", "testbed.experiments", "testbed.bench", "testbed.scenarios", "testbed.demo",
     "testbed.vagrant_lab"),
    ("testbed.cli", "testbed.cli_bench", "testbed.cli_scenarios", "testbed.cli_vcenter", "testbed.cli_images"),
]


def layer(module: str) -> int | None:
    best: tuple[int, int] | None = None       # (prefix length, layer)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), i)
    return None if best is None else best[1]


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(n, m) for n, m in out if m == "testbed" or m.startswith("testbed.")]


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_every_module_has_a_layer() -> None:
    missing = [module_of(f) for f in sorted((ROOT / "testbed").rglob("*.py"))
               if module_of(f) != "testbed" and layer(module_of(f)) is None]
    assert not missing, f"modules without a layer (add them to LAYERS and to the README's map): {missing}"


def test_no_import_runs_up_a_layer() -> None:
    upward = []
    for f in sorted((ROOT / "testbed").rglob("*.py")):
        mine = layer(module_of(f))
        if mine is None:
            continue
        for line, name in imports(f):
            theirs = layer(name)
            if theirs is not None and theirs > mine:
                upward.append(f"{f.relative_to(ROOT)}:{line} imports {name} "
                              f"(layer {theirs} above its own {mine})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule itself: a lab module that imports the vCenter is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from testbed.vcenter.service import VCenter\n")
    found = [(n, m) for n, m in imports(bad) if (layer(m) or 0) > layer("testbed.lab.builder")]  # type: ignore[operator]
    assert found == [(2, "testbed.vcenter.service"), (2, "testbed.vcenter.service.VCenter")]


def test_every_error_class_lives_in_the_one_tree() -> None:
    """Every exception the testbed defines is in ``testbed/errors.py`` under ``TestbedError`` (a private one that
    never leaves its module, such as an experiment's stop signal, excepted)."""
    import inspect

    from testbed import errors
    outside = []
    for f in sorted((ROOT / "testbed").rglob("*.py")):
        if f.name == "errors.py" and f.parent.name == "testbed":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and any(
                    (getattr(b, "id", None) or getattr(b, "attr", "")).endswith(("Error", "Exception", "Mismatch",
                                                                                 "NotFound", "Conflict"))
                    for b in node.bases):
                outside.append(f"{f.relative_to(ROOT)}:{node.lineno} class {node.name}")
    assert not outside, "exception classes outside testbed/errors.py:\n" + "\n".join(outside)
    loose = [n for n, c in inspect.getmembers(errors, inspect.isclass)
             if issubclass(c, Exception) and not issubclass(c, errors.TestbedError)]
    assert not loose, f"errors.py classes outside the TestbedError tree: {loose}"


def test_no_file_is_over_500_lines() -> None:
    """A file a newcomer can read: split one that grows past this by what its parts do."""
    long = {str(f.relative_to(ROOT)): n for f in sorted((ROOT / "testbed").rglob("*.py"))
            if (n := len(f.read_text().splitlines())) > 500}
    assert not long, f"files over 500 lines: {long}"


def test_no_test_module_imports_another() -> None:
    """Tests share helpers (``labkit``, ``agentkit``, ``vckit``, ``fake_agent``) and fixtures (the conftests), never
    each other: a test module that another imports runs its tests twice and ties them together."""
    found = []
    for f in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module or ''}.{a.name}" for a in node.names] + [node.module or '']
                     if isinstance(node, ast.ImportFrom) else [])
            found += [f"{f.relative_to(ROOT)}:{node.lineno} {n}" for n in names  # type: ignore[attr-defined]
                      if any(part.startswith("test_") for part in n.split("."))]
    assert not found, f"test modules imported by others: {found}"
