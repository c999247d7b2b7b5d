"""The import rules of the README's Architecture section: every module imports only its
own layer or the layers below (imports inside functions count), and no modules import
each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Folders -> the package they install as (pyproject's package-dir).
ROOTS = {"xcompile": "xcompile", "schedules": "xcompile.schedules", "targets": "xcompile.targets"}

# The layers, bottom first: a module may import its own layer and those below.
LAYERS = [
    ["xcompile.errors", "xcompile.signals", "xcompile.versions", "xcompile.files",
     "xcompile.manifest"],
    ["xcompile.targets"],
    ["xcompile.schedules"],
    ["xcompile.models", "xcompile.frontend", "xcompile.params_file", "xcompile.runtime"],
    ["xcompile.batch_norm_folding", "xcompile.batch_tiling", "xcompile.clip_recovery",
     "xcompile.leaky_relu", "xcompile.winograd",
     "xcompile.polynomial_math",
     "xcompile.kernel_pairs", "xcompile.activation_fusion", "xcompile.separable_fusion",
     "xcompile.pipeline", "xcompile.cuda_codegen"],
    ["xcompile.tuning"],
    ["xcompile.build"],
    ["xcompile.runner", "xcompile.reference", "xcompile.verify", "xcompile.peers",
     "xcompile.own_process", "xcompile.process_idle", "xcompile.fma_peak", "xcompile.bench",
     "xcompile.tuning_validation",
     "xcompile.package", "xcompile.refit", "xcompile.kit"],
    ["xcompile.cli", "xcompile.__main__"],
]


def modules() -> dict[str, Path]:
    """Module name -> file, for every Python file of the three installed folders."""
    found = {}
    for folder, package in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def layer_of(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ours that ``module`` imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    out = set()

    def deepest(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                prefix = f"{base}.{node.module}" if node.module else base
            else:
                prefix = node.module or ""
            candidates = [f"{prefix}.{alias.name}" for alias in node.names] or [prefix]
        else:
            continue
        for name in candidates:
            target = deepest(name)
            if target is not None and target != module:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) is None and m != "xcompile"] == []


def test_no_module_imports_a_layer_above_it():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in graph().items() if m != "xcompile"
              for t in sorted(targets) if layer_of(t) is not None
              and layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_import_cycles():
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_rules_can_fail():
    """The checker sees an upward import inside a function, and a cycle."""
    import textwrap

    known = {"xcompile.errors": Path("e.py"), "xcompile.build": Path("b.py")}
    src = textwrap.dedent("""
        def f():
            from xcompile.build import compile_model
    """)
    tmp = REPO / "tests" / "_upward_probe.py"
    tmp.write_text(src)
    try:
        assert imports("xcompile.errors", tmp, known) == {"xcompile.build"}
    finally:
        tmp.unlink()
    assert layer_of("xcompile.build") > layer_of("xcompile.errors")
