"""The package's shape: layers import downwards only, and importing imgfeat stays cheap."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "lib", "imgfeat")

# Sub-packages (and top-level modules) in the order data walks through them: each may import only
# those before it. The doors (cli, demo, bench) come last and may import anything.
LAYERS = ["config", "jvm_archive", "session", "standalone", "store", "io", "backbones", "engines", "featurize", "compat", "scoring", "train",
          "finetune", "serve", "bench", "demo", "cli"]


def _imports() -> dict[str, set[str]]:
    """module -> imgfeat modules it imports anywhere in its source (lazy imports included)."""
    graph: dict[str, set[str]] = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
            module = rel.removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imgfeat."):
                    found.add(node.module)
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names if a.name.startswith("imgfeat.")}
            graph[module] = found
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_module_belongs_to_a_layer():
    assert {_layer(m) for m in _imports() if m != "imgfeat"} <= set(LAYERS)


def test_layers_import_only_downwards():
    upward = []
    for module, targets in _imports().items():
        if module == "imgfeat":
            continue
        mine = LAYERS.index(_layer(module))
        upward += [f"{module} -> {t}" for t in targets if LAYERS.index(_layer(t)) > mine]
    assert not upward, upward


def test_no_import_cycles_between_modules():
    graph = _imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_importing_the_package_and_its_light_modules_loads_no_framework():
    code = (
        "import sys, imgfeat, imgfeat.config, imgfeat.io.decoders, imgfeat.backbones.registry, imgfeat.engines, "
        "imgfeat.train.heads, imgfeat.cli\n"
        "print(','.join(m for m in ('pyspark', 'tensorflow', 'keras', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "lib")})
    assert done.stdout.strip() == ""
