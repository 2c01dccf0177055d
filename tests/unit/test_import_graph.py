"""The packages of vidtune import each other one way only.

The graph is built statically from every module's AST, imports inside functions included (a
lazy import is still a dependency), with one node per package or top-level module of vidtune.
A cycle fails; so does an edge that points up the documented layering.
"""
import ast
import subprocess
import sys
from pathlib import Path

import vidtune

ROOT = Path(vidtune.__file__).parent

# Bottom to top (docs/architecture.md). A node may import nodes of its own layer or below.
LAYERS = [
    {"runtime", "fsutil", "integrity", "native", "quiet"},
    {"config"},
    {"distributed"},
    {"models"},
    {"memory", "data", "adapters", "sample"},
    {"build"},
    {"measure"},
    {"planner", "convert"},
    {"bench", "train"},
    {"testing"},
    {"cli"},
]
LEVEL = {n: i for i, layer in enumerate(LAYERS) for n in layer}


def _node(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "vidtune" and len(parts) > 1 else None


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        yield name, path


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in _modules():
        src = _node(name)
        if src is None or name.endswith(".__main__"):  # entry points: nothing imports them
            continue
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]  # from vidtune import native
            for t in targets:
                dst = _node(t)
                if dst is not None and dst != src:
                    graph.setdefault(src, set()).add(dst)
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_cycle_between_packages():
    graph = import_graph()
    assert graph, "no imports found: the walker is broken"
    assert {"build", "measure", "planner", "train", "cli"} <= set(graph)
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_imports_point_down_the_layers():
    graph = import_graph()
    nodes = set(graph) | {m for v in graph.values() for m in v}
    assert nodes <= set(LEVEL), f"add {sorted(nodes - set(LEVEL))} to LAYERS"
    up = sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs if LEVEL[b] > LEVEL[a])
    assert not up, f"imports that point up the layers: {up}"


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_main_only_in_cli():
    mains = [name for name, path in _modules()
             if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text()).body)]
    assert mains and all(m == "vidtune.cli" or m.startswith("vidtune.cli.") for m in mains), mains


def test_every_module_imports_in_a_fresh_process():
    names = [n for n, _ in _modules() if not n.endswith(".__main__")]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint('ok', len(sys.argv) - 1)"
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
