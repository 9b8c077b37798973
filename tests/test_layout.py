"""The package's layers: the imports among fused_flat's modules go one way.

The import graph is read from the sources (ast; no module is imported): an edge A -> B for
every ``import`` / ``from ... import`` of a fused_flat module B in A and every
``importlib.import_module("...")`` with a literal name, at module level (run when A is
imported: the module body, class bodies, top-level if / try) or inside a function (run when
it is called). ``from P import name`` is an edge to the module P.name where that is a
module, else to P.

* No cycles, counting both kinds of edge: a function-level import that closes a loop still
  means two modules each need the other. One exception, since it is harmless: a module
  importing a package it lives in (its parent's ``__init__``, loaded before it anyway)
  closes a loop only when that package imports the module back at module level.
* The floors: fused_flat.optim (the optimizers) sits on fused_flat.backends and
  fused_flat.noise, never below them; the backend modules sit below the resolver
  (fused_flat/backends/__init__.py) and take what they share from fused_flat.backends.base,
  so no backend module imports the resolver, at any level.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fused_flat"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(mod: str, modules: dict[str, Path]) -> bool:
    return modules[mod].name == "__init__.py"


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is a fused_flat module."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def _imports(mod: str, modules: dict[str, Path]):
    """(target module, at module level) for every import of a fused_flat module in ``mod``."""
    tree = ast.parse(modules[mod].read_text(), filename=str(modules[mod]))
    package = mod if _is_package(mod, modules) else mod.rpartition(".")[0]
    out = []

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    t = _target(alias.name, modules)
                    if t is not None:
                        out.append((t, top))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                for alias in child.names:
                    t = modules.get(f"{source}.{alias.name}") and f"{source}.{alias.name}"
                    t = t or _target(source, modules)
                    if t is not None:
                        out.append((t, top))
            elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                  and child.func.attr == "import_module" and child.args
                  and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)):
                t = _target(child.args[0].value, modules)
                if t is not None:
                    out.append((t, top))
            visit(child, inner)

    visit(tree, True)
    return [(t, top) for t, top in out if t != mod]


def import_graph() -> dict[str, dict[str, bool]]:
    """{module: {imported module: whether some import of it is at module level}}."""
    modules = _modules()
    graph = {}
    for mod in modules:
        edges: dict[str, bool] = {}
        for t, top in _imports(mod, modules):
            edges[t] = edges.get(t, False) or top
        graph[mod] = edges
    return graph


def _ancestor(pkg: str, mod: str) -> bool:
    return mod.startswith(pkg + ".")


def cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each a loop of imports),
    after dropping the harmless edges to an enclosing package (module docstring)."""
    edges = {m: [t for t, top in out.items()
                 if not (_ancestor(t, m) and not graph.get(t, {}).get(m, False))]
             for m, out in graph.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):   # Tarjan, recursive: the graph is a few dozen modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_the_graph_sees_the_imports():
    """The reader finds imports of every kind (a check of the checker)."""
    g = import_graph()
    assert g["fused_flat.backends"]["fused_flat.backends.base"] is True           # module level
    assert g["fused_flat.backends"]["fused_flat.backends.triton"] is False        # import_module
    assert g["fused_flat.backends.triton"]["fused_flat.backends.base"] is True
    assert g["fused_flat.backends.triton"]["fused_flat.backends.triton.multi"] is False
    assert "fused_flat.backends" in g["fused_flat.optim.core"]
    # a made-up loop is found, and the enclosing-package exception holds only one way
    assert cycles({"a": {"b": False}, "b": {"a": True}}) == [["a", "b"]]
    assert cycles({"p": {}, "p.x": {"p": True}}) == []
    assert cycles({"p": {"p.x": True}, "p.x": {"p": False}}) == [["p", "p.x"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles among fused_flat modules:\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_optim_is_above_backends_and_noise():
    g = import_graph()
    low = [m for m in g if m == "fused_flat.backends" or m.startswith("fused_flat.backends.")]
    low.append("fused_flat.noise")
    bad = {m: sorted(t for t in g[m] if t == "fused_flat.optim" or t.startswith("fused_flat.optim."))
           for m in low}
    assert not any(bad.values()), f"imports of fused_flat.optim below it: {bad}"


def test_backend_modules_do_not_import_the_resolver():
    g = import_graph()
    bad = sorted(m for m in g if m.startswith("fused_flat.backends.")
                 and "fused_flat.backends" in g[m])
    assert not bad, f"these import the resolver fused_flat.backends (use fused_flat.backends.base): {bad}"
