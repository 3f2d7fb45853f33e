"""The package's shape: no import cycle, and lower pipeline stages never import higher ones.

Every ``import`` statement counts, module level or inside a function: a lazy import
still couples two modules.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tf_balancer"

# Pipeline stages, lowest first (see ../shared/DESIGN.md). Longest prefix wins.
RANKS = {
    "tf_balancer.errors": 0,
    "tf_balancer._compat": 0,
    "tf_balancer._quiet": 0,
    "tf_balancer.hardware": 0,
    "tf_balancer.input_shapes": 0,
    "tf_balancer.config.checks": 0,
    "tf_balancer.metrics": 0,
    "tf_balancer.report": 1,
    "tf_balancer.graph": 2,
    "tf_balancer.analysis": 2,
    "tf_balancer.attention": 3,
    "tf_balancer.sparse": 4,
    "tf_balancer.passes": 5,
    "tf_balancer.config": 6,  # validates names against the importance and pass registries
    "tf_balancer.verify": 7,
    "tf_balancer.optimizer": 7,
    "tf_balancer.export": 8,
    "tf_balancer.training": 9,
    "tf_balancer.demo": 10,
    "tf_balancer.demo_sequences": 10,
    "tf_balancer.cli": 11,
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Names of the tf_balancer modules ``path`` imports (anywhere in the file)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = _all_modules()
    return {name for name in found if name in modules and name != module}


def _all_modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _rank(module: str) -> int | None:
    matches = [prefix for prefix in RANKS if module == prefix or module.startswith(prefix + ".")]
    return RANKS[max(matches, key=len)] if matches else None


def _graph() -> dict[str, set[str]]:
    return {name: _imports(path) for name, path in _all_modules().items()}


def test_every_module_has_a_stage():
    unranked = [m for m in _all_modules() if m != "tf_balancer" and _rank(m) is None]
    assert not unranked, f"add these modules to RANKS: {unranked}"


def test_lower_stages_never_import_higher_ones():
    violations = [
        f"{module} (stage {_rank(module)}) imports {target} (stage {_rank(target)})"
        for module, targets in _graph().items()
        if module != "tf_balancer"
        for target in targets
        if target != "tf_balancer" and _rank(target) > _rank(module)
    ]
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("stage", ["graph", "attention"])
def test_early_stages_import_nothing_of_training_or_export(stage):
    later = ("passes", "training", "export", "sparse", "optimizer")
    for module, targets in _graph().items():
        if module.startswith(f"tf_balancer.{stage}"):
            bad = [t for t in targets if t.split(".")[1] in later]
            assert not bad, f"{module} imports {bad}"


def test_no_import_cycle():
    graph = _graph()
    # A package's __init__ importing its own submodules is not a cycle of stages.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_cycle_finder_sees_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import is reported."""
    fake = tmp_path / "tf_balancer"
    (fake / "graph").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "graph" / "__init__.py").write_text("")
    (fake / "graph" / "walk.py").write_text("from tf_balancer.training import callback\n")
    (fake / "training").mkdir()
    (fake / "training" / "__init__.py").write_text("")
    (fake / "training" / "callback.py").write_text("from tf_balancer.graph import walk\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="graph.walk .*imports tf_balancer.training"):
        test_lower_stages_never_import_higher_ones()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()
