"""The package's layout rules: no import cycle between graphpatch's modules,
and no pass named outside graphpatch/passes (the core asks the Pass)."""

import ast
import re
from pathlib import Path

from graphpatch.passes import PASSES

PACKAGE = Path(__file__).parents[1] / "graphpatch"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The graphpatch modules ``path`` imports at module level (imports inside
    functions run later and cannot make a cycle at import time)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # ``from graphpatch import fusion`` needs the module fusion, and
            # the package only as far as Python has begun it
            children = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= children if len(children) == len(node.names) else {node.module}
    return found & modules


def test_no_import_cycle():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError(" -> ".join([*trail[trail.index(name) :], name]))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_no_pass_is_named_outside_the_passes():
    """The core, and the coverage tooling (it asks ``Proof.simulate``), name
    no pass and import none of a pass's modules; the zoo and its hints may."""
    names = "|".join(PASSES)
    named = re.compile(
        rf"[\"']({names})[\"']|PASSES\[|(from|import) graphpatch\.passes\.({names})"
    )
    core = [
        p
        for p in PACKAGE.rglob("*.py")
        if not p.is_relative_to(PACKAGE / "passes")
        and (not p.is_relative_to(PACKAGE / "testing") or p.name == "coverage.py")
    ]
    hits = [
        f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for p in core
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if named.search(line)
    ]
    assert hits == []
