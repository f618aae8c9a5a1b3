"""Which of this repo's files the host image carries as its host agent, and their hash.

The agent's closure: every ``testbed`` module that ``testbed.hostd`` and
``testbed.hosts.provision`` import, also inside functions (found by reading the
sources, not by importing them). ``images/host/build.sh`` installs exactly these
files and records ``agent_sha256``; ``testbed.hosts.nested`` compares it with the
sources here to tell a stale image. Standard library only.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
ROOTS = ("testbed.hostd", "testbed.hosts.provision")


def _module_file(mod: str) -> Path | None:
    p = REPO_ROOT.joinpath(*mod.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return None


def agent_files() -> list[str]:
    """Repo-relative paths of the agent's modules (with their packages' ``__init__.py``), sorted."""
    todo = list(ROOTS) + [f"testbed.hostd.{p.stem}" for p in (REPO_ROOT / "testbed" / "hostd").glob("*.py")]
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        for i in range(1, len(parts)):   # parent packages
            todo.append(".".join(parts[:i]))
        f = _module_file(mod)
        if f is None:
            continue
        files.add(f)
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] == "testbed"]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "testbed":
                    todo.append(base)
                    todo += [f"{base}.{a.name}" for a in node.names]   # `from pkg import module`
    return sorted(str(f.relative_to(REPO_ROOT)) for f in files)


def agent_sha256(files: list[str] | None = None) -> str:
    """sha256 over "<sha256>  <path>" lines of the agent's files (like ``sha256sum FILES | sha256sum``)."""
    lines = "".join(f"{hashlib.sha256((REPO_ROOT / f).read_bytes()).hexdigest()}  {f}\n"
                    for f in (files if files is not None else agent_files()))
    return hashlib.sha256(lines.encode()).hexdigest()


if __name__ == "__main__":
    if sys.argv[1:] == ["files"]:
        print("\n".join(agent_files()))
    elif sys.argv[1:] == ["sha256"]:
        print(agent_sha256())
    else:
        print("usage: python -m testbed.hosts.hostimage files|sha256", file=sys.stderr)
        sys.exit(2)
