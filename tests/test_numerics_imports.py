"""numerics/ imports point one way: its module graph is acyclic (imports inside functions
count) and it imports nothing from the layers above it (WORKSPACE.md: numerics ← kernels ←
harness ← methods ← notebooks / papers / scripts). Parsed with ``ast``, nothing imported."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "numerics"
ABOVE = ("kernels", "harness", "methods", "notebooks", "papers", "scripts", "tests")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_module(name: str) -> bool:
    p = ROOT / Path(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _imports(path: Path, src: str | None = None) -> list[tuple[str, int]]:
    """Every module the file ``path`` (or ``src`` as if it were that file) imports, anywhere in
    it (functions included), with its line. ``from a import b`` names the submodule ``a.b``
    when there is one, else ``a`` itself (whose ``__init__`` runs)."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    src = path.read_text() if src is None else src
    out = []
    for node in ast.walk(ast.parse(src, str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .a import b
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if _is_module(sub) else base, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    g = {}
    for path in sorted(PKG.glob("*.py")):
        g[_module(path)] = {m for m, _ in _imports(path) if m.split(".")[0] == "numerics"}
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``g`` as a path ``[a, b, …, a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(g.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if v not in state and (c := visit(v)):
                return c
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(g):
        if u not in state and (c := visit(u)):
            return c
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_parser_sees_every_kind_of_import():
    src = (
        "import numerics.formats\n"
        "from numerics import QArray, packing\n"
        "def f():\n"
        "    from . import leaves\n"
        "    from .qarray import QArray\n"
        "    if True:\n"
        "        import harness.layers\n"
    )
    got = sorted(m for m, _ in _imports(PKG / "sparse.py", src))
    assert got == sorted(
        [
            "numerics.formats",
            "numerics",  # QArray is a name of the package's __init__, not a submodule
            "numerics.packing",
            "numerics.leaves",
            "numerics.qarray",
            "harness.layers",
        ]
    )


def test_graph_covers_the_package():
    g = graph()
    assert {"numerics", "numerics.qarray", "numerics.packing", "numerics.leaves"} <= set(g)
    assert "numerics.packing" in g["numerics.qarray"]  # a real edge is seen


def test_numerics_import_graph_is_acyclic():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle in numerics: " + " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted(PKG.glob("*.py")), ids=lambda p: p.name)
def test_numerics_imports_nothing_from_above(path):
    bad = [(m, line) for m, line in _imports(path) if m.split(".")[0] in ABOVE]
    assert bad == [], f"{path.name} imports from a higher layer: {bad}"
