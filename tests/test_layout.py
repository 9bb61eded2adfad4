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


# --- size: no module over ~600 lines, no function over ~60 ---------------------------------------

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60  # the `def` line to the last line, docstring included, decorators not

# Allowed over the limits only while other work in progress splits them: a module by its path, a
# function by path:qualified name. The tests fail on an entry that is within its limit again, so
# this list can only shrink; it is to be empty once that work has landed.
PENDING: dict[str, str] = {}


def relative(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def function_lengths(source: str, where: str) -> dict[str, int]:
    """Every function and method in `source` by `where:Class.method` (nested ones as
    `outer.inner`), with its length in lines."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    length = child.end_lineno - child.lineno + 1
                    out[f"{where}:{name}"] = max(length, out.get(f"{where}:{name}", 0))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def sizes() -> tuple[dict[str, int], dict[str, int]]:
    """Every module of the package with its length in lines, and every function with its own."""
    modules: dict[str, int] = {}
    functions: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        modules[relative(path)] = len(text.splitlines())
        functions |= function_lengths(text, relative(path))
    return modules, functions


def check_sizes(lengths: dict[str, int], limit: int, pending: list[str], what: str) -> None:
    over = {name: n for name, n in lengths.items() if n > limit}
    offenders = sorted(f"{name} ({n} lines)" for name, n in over.items() if name not in pending)
    assert not offenders, f"{what} over {limit} lines: {', '.join(offenders)}"
    done = sorted(name for name in pending if name not in over)
    assert not done, f"{', '.join(done)}: within {limit} lines now (or gone); remove from PENDING"


def test_function_lengths_are_measured_from_def_to_last_line():
    source = "@cache\ndef f():\n    '''doc'''\n    return 1\n\n\nclass A:\n    def m(self):\n        def g():\n            pass\n"
    assert function_lengths(source, "x.py") == {"x.py:f": 3, "x.py:A.m": 3, "x.py:A.m.g": 2}


def test_no_module_is_over_600_lines():
    modules, _ = sizes()
    assert len(modules) > 20 and "finetune/config.py" in modules  # the walk sees the package
    check_sizes(modules, MAX_MODULE_LINES, [name for name in PENDING if ":" not in name], "modules")


def test_no_function_is_over_60_lines():
    _, functions = sizes()
    assert "finetune/formats/archives.py:_Tree.claim" in functions  # the walk sees methods too
    check_sizes(functions, MAX_FUNCTION_LINES, [name for name in PENDING if ":" in name], "functions")
