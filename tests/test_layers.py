"""The package's layers, read from its imports (those inside functions too): no arrow runs from a lower layer to a
higher one, and no module imports itself back through others. docs/ARCHITECTURE.md states the same layers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fluxstudio"
# lowest first; a module may import its own layer and the ones below
LAYERS = [
    (
        "base",
        (
            "fluxstudio",
            "fluxstudio.errors",
            "fluxstudio.paths",
            "fluxstudio.units",
            "fluxstudio.progress",
            "fluxstudio.offline_kernels",
        ),
    ),
    ("engine and quant", ("fluxstudio.engine", "fluxstudio.quant")),
    ("sources", ("fluxstudio.sources",)),
    ("formats", ("fluxstudio.formats",)),
    ("advice", ("fluxstudio.advice",)),
    ("flows", ("fluxstudio.flows",)),
    ("library", ("fluxstudio.library",)),
    ("front door", ("fluxstudio.studio",)),
    ("edges", ("fluxstudio.cli", "fluxstudio.ui", "fluxstudio.__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    best = max(
        (
            prefix
            for _, prefixes in LAYERS
            for prefix in prefixes
            if module == prefix or (prefix != "fluxstudio" and module.startswith(prefix + "."))
        ),
        key=len,
        default="fluxstudio",
    )
    return next(i for i, (_, prefixes) in enumerate(LAYERS) if best in prefixes)


def imports(module: str) -> set[str]:
    """The package's modules this one imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fluxstudio"):
            for alias in node.names:  # `from fluxstudio.x import y`: the submodule y when there is one
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fluxstudio")}
    return found - {module}


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    assert len(MODULES) > 40
    up = [
        f"{m} ({LAYERS[layer(m)][0]}) -> {d} ({LAYERS[layer(d)][0]})"
        for m in MODULES
        for d in imports(m)
        if layer(d) > layer(m)
    ]
    assert up == []


def test_quant_knows_nothing_of_formats():
    quant = [m for m in MODULES if m.startswith("fluxstudio.quant")]
    assert len(quant) >= 4 and not [
        (m, d) for m in quant for d in imports(m) if not d.startswith(("fluxstudio.quant", "fluxstudio.errors"))
    ]


def test_there_are_no_import_cycles():
    graph = {m: imports(m) & set(MODULES) for m in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_architecture_doc_lists_these_layers():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\s*\d+\. \*\*([a-z ]+)\*\*", doc, flags=re.MULTILINE)
    assert listed == [name for name, _ in LAYERS]
