"""The package's import graph: no cycles between modules, and each folder imports only downward.

Imports are read from the source (module level and inside functions alike, since a lazy import is
still a dependency); imports under `if TYPE_CHECKING:` are left out, as they never run.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import isolhub

PACKAGE = Path(isolhub.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """`module -> the isolhub modules it imports` (dotted names, `isolhub.` included)."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for me, path in modules.items():
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found = sub if sub in modules else target
                    if found in modules and found != me:
                        graph[me].add(found)
            elif isinstance(node, ast.Import):
                graph[me] |= {a.name for a in node.names if a.name in modules and a.name != me}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_lazy_imports_and_finds_a_cycle() -> None:
    graph = import_graph()
    assert "isolhub._compare.html" in graph["isolhub._compare.report"]  # imported in a method
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_that_imports_it_back() -> None:
    assert cycles(import_graph()) == []


def _import_base(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    return ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def underscore_uses_in(tree: ast.AST, me: str, package: str, modules: set[str]) -> list[str]:
    """`line: what` for each use in `tree` of another isolhub module's `_underscore` name."""
    found = []
    aliases: dict[str, str] = {}  # local name -> the isolhub module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name: a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = _import_base(node, package)
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
                elif base in modules and base != me and _private(a.name):
                    found.append(f"{node.lineno}: from {base} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = aliases.get(ast.unparse(node.value), me)
            if owner != me and f"{owner}.{node.attr}" not in modules:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(found, key=lambda f: int(f.split(":")[0]))


def test_the_underscore_reader_sees_imports_and_attributes() -> None:
    source = (
        "from . import _a\n"
        "from ._b import _c, d\n"
        "import isolhub._d as m\n"
        "from ._e import _own\n"
        "_a._x; m._y; m.z; _a._f.g; _own._z\n"
    )
    modules = {"isolhub._a", "isolhub._a._f", "isolhub._b", "isolhub._d", "isolhub._e"}
    assert underscore_uses_in(ast.parse(source), "isolhub._e", "isolhub", modules) == [
        "2: from isolhub._b import _c",
        "5: _a._x",
        "5: m._y",
    ]


def test_no_module_uses_another_modules_underscore_names() -> None:
    modules = _modules()
    found = []
    for me, path in sorted(modules.items()):
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(PACKAGE.parent)
        found += [f"{where}:{f}" for f in underscore_uses_in(tree, me, package, set(modules))]
    assert found == []


def test_every_module_declares_all() -> None:
    missing = []
    for me, path in sorted(_modules().items()):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = [
            t
            for node in tree.body
            if isinstance(node, ast.Assign | ast.AnnAssign)
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        ]
        if not any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            missing.append(me)
    assert missing == []


# Each stage of the flow, lowest first: a module imports only its own folder and the layers
# below it (a layer's units may not import each other unless `ACROSS` says so).
LAYERS = [
    "_errors _escape _version _libc _memfd _locks _config _progress",
    "_usage _spec _errormap",
    "_http",
    "_sandbox _transport",
    "_types",
    "_options",
    "_cache",
    "_source _weights _env",
    "_process",
    "_handle",
    "_engine",
    "_api",
    "_patch _pool _compare",
    "_cli",
    "run __main__ isolhub",
]
# Allowed imports between units of one layer, or upward, each with its reason.
# `isolhub cache` accounts for everything under the hub dir, so its inventory reads the naming
# rules of what the layers above it write there.
ACROSS = {
    ("_cache.inventory", "_weights.checkpoints"): "a checkpoint's name carries its hash prefix",
    ("_cache.inventory", "_weights.download"): "a partial download still being written is live",
    ("_cache.inventory", "_process.preload"): "the learned preloads' temp files are swept",
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "isolhub"


def _rank(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer.split():
            return i
    raise AssertionError(f"isolhub.{unit} is in no layer of tests/test_import_graph.py")


def _allowed(me: str, dep: str) -> bool:
    mine, theirs = _unit(me), _unit(dep)
    if mine == theirs or _rank(mine) > _rank(theirs):
        return True
    return (me.removeprefix("isolhub."), dep.removeprefix("isolhub.")) in ACROSS


def test_each_folder_imports_only_its_own_and_the_layers_below() -> None:
    wrong = sorted(
        f"{me} imports {dep}"
        for me, deps in import_graph().items()
        for dep in deps
        if not _allowed(me, dep)
    )
    assert wrong == []


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        _rank(_unit(module))


def test_transport_imports_nothing_of_the_process_layer() -> None:
    graph = import_graph()
    assert not {
        (me, dep)
        for me, deps in graph.items()
        if me.startswith("isolhub._transport")
        for dep in deps
        if dep.startswith("isolhub._process")
    }


def test_each_allowed_exception_is_still_needed() -> None:
    graph = import_graph()
    assert {
        pair for pair in ACROSS if "isolhub." + pair[1] not in graph.get("isolhub." + pair[0], ())
    } == set()
