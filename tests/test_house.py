"""House rules checked on the source (pure AST, no jax import): functions fit on a screen, and the jaxmoe
modules import each other without cycles (function-local imports count: a cycle hidden by a local import is
still a cycle)."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "jaxmoe")
MAX_LINES = 80
LONG_ALLOWED: set[str] = set()  # "path:function" exceptions (none)
CYCLES_ALLOWED: list[list[str]] = []  # exceptions (none)


def _modules() -> dict[str, ast.Module]:
    """module name ('jaxmoe.train.loop', packages as 'jaxmoe.lora') -> its parsed source."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in (f for f in files if f.endswith(".py")):
            path = os.path.join(d, f)
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            with open(path) as fh:
                out[rel.removesuffix(".__init__")] = ast.parse(fh.read(), path)
    return out


def long_functions(modules: dict[str, ast.Module]) -> list[str]:
    found = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                key = f"{_path(name, modules)}:{node.name}"
                if n > MAX_LINES and key not in LONG_ALLOWED:
                    found.append(f"{key} (line {node.lineno}): {n} lines")
    return found


def _path(name: str, modules) -> str:
    return name.replace(".", "/") + ("/__init__.py" if _package(name, modules) == name else ".py")


def _package(name: str, modules) -> str:
    """The package a module's relative imports start from."""
    return name if any(m.startswith(name + ".") for m in modules) else name.rpartition(".")[0]


def imports_of(name: str, tree: ast.Module, modules) -> set[str]:
    """jaxmoe modules `name` imports anywhere in its body (module level or inside functions). `from pkg
    import sub` counts as importing pkg.sub when sub is a module."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package(name, modules).split(".")
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            out |= {t} if t.startswith("jaxmoe") else set()
    return out - {name}


def import_cycles(modules: dict[str, ast.Module]) -> list[list[str]]:
    """One cycle per strongly connected component of the import graph (Tarjan), packages importing their
    own submodules excluded (`jaxmoe.lora` re-exporting `jaxmoe.lora.adapters` is not a cycle by itself)."""
    graph = {m: {d for d in imports_of(m, t, modules) if not d.startswith(m + ".")} for m, t in modules.items()}
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on.discard(w)
                comp.append(w)
            on.discard(v)
            if comp:
                comps.append(sorted(comp + [v]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_functions_fit_on_a_screen():
    long = long_functions(_modules())
    assert not long, f"functions over {MAX_LINES} lines (split them into named pieces):\n" + "\n".join(long)


def test_no_import_cycles():
    cycles = [c for c in import_cycles(_modules()) if c not in CYCLES_ALLOWED]
    assert not cycles, "import cycles between jaxmoe modules (move the shared code to the module it belongs " \
                       "to):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_model_never_imports_lora():
    """Adapters reach the matmuls through model/deltas.py's generic hook, built by jaxmoe.lora.attach."""
    mods = _modules()
    bad = {m: sorted(d for d in imports_of(m, t, mods) if d.startswith("jaxmoe.lora"))
           for m, t in mods.items() if m.startswith("jaxmoe.model")}
    assert not {m: d for m, d in bad.items() if d}


def test_checks_catch_a_long_function_and_a_local_import_cycle():
    src_a = "def f():\n" + "    x = 1\n" * MAX_LINES + "    from jaxmoe.b import g\n"
    mods = {"jaxmoe": ast.parse(""), "jaxmoe.a": ast.parse(src_a),
            "jaxmoe.b": ast.parse("from jaxmoe import a\n")}
    assert long_functions(mods) == [f"jaxmoe/a.py:f (line 1): {MAX_LINES + 2} lines"]
    assert import_cycles(mods) == [["jaxmoe.a", "jaxmoe.b"]]
