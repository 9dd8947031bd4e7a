"""Every module of geb_jax imports alone in a fresh interpreter, and no geb_jax module imports
itself through others.

The cycle check reads the source with `ast`, so it also sees the imports placed inside functions
to dodge a cycle: such an import works at run time but still ties the two modules together.
"""
from __future__ import annotations

import ast
import concurrent.futures
import os
import subprocess
import sys
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "geb_jax"


def all_modules(root: str = REPO_ROOT) -> dict[str, str]:
    """Dotted module name -> file path, for every .py file under geb_jax/."""
    modules = {}
    for folder, dirs, files in os.walk(os.path.join(root, PACKAGE)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name a `from ... import` statement reads from (handles relative imports)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The geb_jax modules that `module` imports anywhere in its file (top level or in a function).

    `from pkg import name` counts as importing pkg.name when that is a module, else pkg itself.
    Parent packages are not counted: Python runs them first, but a package's __init__ importing
    its own submodules is the ordinary layout, not a cycle.
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    found.add(f"{source}.{alias.name}")
                elif source in modules:
                    found.add(source)
    found.discard(module)
    return found


def import_graph(root: str = REPO_ROOT) -> dict[str, set[str]]:
    modules = all_modules(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: an iterative depth-first search over the graph."""
    state = {}  # module -> 1 while on the current path, 2 when finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_reports_a_planted_cycle():
    """The detector itself: a three-module ring is found and printed in order; a DAG is not."""
    ring = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(ring) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_function_level_and_relative_imports(tmp_path):
    """Imports inside functions and relative imports are edges, as are `from pkg import mod`."""
    pkg = tmp_path / PACKAGE / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from geb_jax.sub.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (pkg / "b.py").write_text("import geb_jax.sub.c\n")
    (pkg / "c.py").write_text("from geb_jax.sub import a\n")
    graph = import_graph(str(tmp_path))
    assert graph["geb_jax.sub"] == {"geb_jax.sub.a"}
    assert graph["geb_jax.sub.a"] == {"geb_jax.sub.b"}
    assert find_cycle(graph) == ["geb_jax.sub.a", "geb_jax.sub.b", "geb_jax.sub.c",
                                 "geb_jax.sub.a"]


def test_no_import_cycles_between_geb_jax_modules():
    graph = import_graph()
    assert len(graph) > 50, sorted(graph)  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_data_does_not_reach_up_into_models_or_serving():
    """geb_jax.data is below the model, training, checkpoints, serving and evaluation: only its
    CLI (data/prepare.py, the place that wires the cleaning chain to a model) may import them."""
    upper = ("geb_jax.model", "geb_jax.train", "geb_jax.checkpoint", "geb_jax.infer",
             "geb_jax.export", "geb_jax.eval")
    graph = import_graph()
    reaching = {name: sorted(m for m in deps if m.startswith(upper))
                for name, deps in graph.items()
                if name.startswith("geb_jax.data") and name != "geb_jax.data.prepare"}
    assert not {k: v for k, v in reaching.items() if v}


def _import_alone(name: str) -> tuple[str, int, str, float]:
    """`python -c "import name"` in a new interpreter: its exit status, stderr and wall time."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=300, check=False)
    return name, proc.returncode, proc.stderr, time.monotonic() - start


def test_every_module_imports_alone_in_a_fresh_process():
    """One interpreter per module, so no module is helped by another imported before it; a few
    run at once (threads only wait on the child processes)."""
    names = sorted(all_modules())
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_import_alone, names))
    slowest = sorted(results, key=lambda r: -r[3])[:3]
    print(f"imported {len(names)} modules alone in {time.monotonic() - start:.1f} s; slowest: "
          + ", ".join(f"{name} {secs:.1f} s" for name, _, _, secs in slowest))
    failed = [f"--- {name} (exit {rc})\n{err}" for name, rc, err, _ in results if rc]
    assert not failed, "\n".join(failed)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
