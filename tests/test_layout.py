"""The package's imports point one way: no module of finetune/ imports, directly or through others,
a module that imports it back (imports inside functions count too: they only postpone the cycle),
and no module takes another's private (underscored) names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> dict[str, list[str]]:
    """The package's modules that `path` imports, each with the names it takes from it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    out.setdefault(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:  # `from . import compiled`
                    out.setdefault(target, [])
                elif base in modules:
                    out.setdefault(base, []).append(alias.name)
    out.pop(name, None)
    return out


def graph() -> dict[str, dict[str, list[str]]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": []}, "b": {}}) == []


def test_no_import_cycle_in_the_package():
    edges = graph()
    assert len(edges) > 20 and edges["finetune.serving.server"]  # the walk sees the package
    assert cycles(edges) == []


def test_no_module_takes_another_modules_private_names():
    taken = {
        (module, target, name)
        for module, targets in graph().items()
        for target, names in targets.items()
        for name in names
        if name.startswith("_") and not name.startswith("__")
    }
    assert taken == set()


# The packages in data-flow order: a package imports only those of a lower rank (equal ranks are
# siblings that never import each other: training and serving both use the engine, not each other).
RANKS = {
    "errors": 0, "finetune": 0, "staging": 0, "workdirs": 0, "config": 1, "settings": 2,
    "data": 3, "model": 4, "engine": 5, "memory": 6, "formats": 6,
    "training": 7, "serving": 7, "cog": 8, "__main__": 9,
}  # fmt: skip


def package_of(module: str) -> str:
    """finetune.engine.scheduler -> engine; finetune.config -> config; finetune -> finetune."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward_imports(edges: dict[str, dict[str, list[str]]]) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, targets in edges.items()
        for target in targets
        if package_of(module) != package_of(target) and RANKS[package_of(module)] <= RANKS[package_of(target)]
    )


def test_the_rank_check_catches_an_import_up_or_sideways():
    edges = {
        "finetune.data.records": {"finetune.model.loading": []},
        "finetune.training.x": {"finetune.serving.y": []},
    }
    assert upward_imports(edges) == [
        "finetune.data.records -> finetune.model.loading",
        "finetune.training.x -> finetune.serving.y",
    ]
    assert upward_imports({"finetune.model.loading": {"finetune.data.records": []}}) == []


def test_packages_import_only_those_below_them():
    edges = graph()
    assert {package_of(m) for m in edges} == set(RANKS)  # a new package or top-level module gets a rank
    assert upward_imports(edges) == []
