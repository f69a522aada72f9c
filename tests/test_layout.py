"""The package's shape: no import cycles in pathsgd/ (function-level imports included)."""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Optional, Set

import pathsgd

PACKAGE_DIR = os.path.dirname(pathsgd.__file__)


def package_imports(package_dir: str = PACKAGE_DIR, package: str = "pathsgd") -> Dict[str, Set[str]]:
    """``{module: modules of the package it imports}``, from every import statement anywhere in
    its source (module level, inside functions, under ``if``), parsed with ast."""
    modules = {f[:-3] for f in os.listdir(package_dir) if f.endswith(".py")}
    graph: Dict[str, Set[str]] = {}
    for name in sorted(modules):
        with open(os.path.join(package_dir, name + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        deps: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from . import x / from .x import y
                    targets = [node.module] if node.module else [a.name for a in node.names]
                elif node.level == 0 and node.module and node.module.split(".")[0] == package:
                    parts = node.module.split(".")
                    targets = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
                else:
                    continue
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names
                           if a.name.startswith(package + ".") and len(a.name.split(".")) > 1]
            else:
                continue
            deps.update(t.split(".")[0] for t in targets if t and t.split(".")[0] in modules)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(n: str) -> Optional[List[str]]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = package_imports()
    assert {"graph", "optimizer", "functional", "eval_tape"} <= set(graph), sorted(graph)
    assert "graph" in graph["optimizer"] and "ops" in graph["eval_dense"]  # the parser sees the imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in pathsgd/: " + " -> ".join(cycle)


def test_cycle_detector_finds_function_level_cycles(tmp_path):
    """Negative control: a cycle hidden in a function-level import is found."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .c import g\n    return g\n")
    (tmp_path / "c.py").write_text("import os\n\ndef g():\n    from pkg.a import x\n")
    graph = package_imports(str(tmp_path), "pkg")
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
