"""The architecture as a test: no import cycle among the product packages, and dependencies point one way.

Every `import` statement counts, at module level or inside a function (a lazy import is still a dependency).
An import of a package's submodule counts as an edge to that submodule, not to the package's `__init__`.

Allowed directions: service -> common; workers -> adaptors, common, testbed; adaptors -> common, testbed;
common -> nothing of the product; testbed -> nothing of the product. Research code (research/) and benchmarks
are not product packages and no product module may import them.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("service", "workers", "adaptors", "common", "testbed")
ALLOWED: dict[str, set[str]] = {
    "service": {"common"},
    "workers": {"adaptors", "common", "testbed"},
    "adaptors": {"common", "testbed"},
    "common": set(),
    "testbed": set(),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PRODUCT:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imported_names(module: str, path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Product module -> the product modules it imports (a name is resolved to the longest module it starts with)."""
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in mods.items():
        graph[module]
        for name in _imported_names(module, path):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
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


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_product_packages():
    assert cycles(import_graph()) == []


def test_dependencies_point_one_way():
    back_edges = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if (a := module.split(".")[0]) != (b := target.split(".")[0]) and b not in ALLOWED[a]
    )
    assert back_edges == []


@pytest.mark.parametrize("outside", ["research", "benchmarks", "tests"])
def test_product_code_never_imports_research_benchmarks_or_tests(outside):
    offenders = sorted(
        str(path.relative_to(ROOT))
        for path in _modules().values()
        if any(n == outside or n.startswith(outside + ".") for n in _imported_names("x", path))
    )
    assert offenders == []


def test_the_gateways_base_model_aliases_are_the_profiles():
    """common.adaptor_matching keeps the aliases as plain data for the torch-free gateway; workers read profiles."""
    from adaptors.profiles import get_profile
    from common.adaptor_matching import BASE_MODEL_ALIASES

    for name, aliases in BASE_MODEL_ALIASES.items():
        profile = get_profile(name)
        assert profile is not None and tuple(profile.aliases) == aliases


# The base-model seam: the testbed enters product code through its profile only. The CNN head reader
# loads heads in the testbed CNN's on-disk format, whose architecture the testbed defines.
TESTBED_DOORS = {"adaptors.testbed_profile", "adaptors.classifiers"}


def test_product_code_reaches_the_testbed_only_through_its_profile():
    graph = import_graph()
    entering = sorted(
        module for module, deps in graph.items()
        if not module.startswith("testbed") and any(d == "testbed" or d.startswith("testbed.") for d in deps)
    )  # fmt: skip
    assert set(entering) <= TESTBED_DOORS, (
        f"modules importing the testbed besides its profile: {sorted(set(entering) - TESTBED_DOORS)}"
    )
