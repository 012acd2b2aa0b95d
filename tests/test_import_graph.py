"""alignkit's modules import one another without a circle, and the recipe settings import no behaviour.

The graph is read from the source with ``ast``: every ``import`` of an alignkit module, at module level or
inside a function (a function-level import is still a dependency, only a later one). Importing ``a.b.c``
from outside the package ``a.b`` runs ``a/b/__init__.py`` first, so that package is a dependency too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "alignkit"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package by its ``__init__.py``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_names(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """What an import statement names, as dotted paths (``from a import b`` names ``a.b``, module or not)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parent, base] if base else parent)
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int]]]:
    """(module -> the alignkit modules it imports, [(module, line) of each function-level alignkit import])."""
    modules = _modules()

    def module_of(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    in_functions: list[tuple[str, int]] = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        inside_functions = {id(node) for node in _function_imports(tree)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            # A module inside a package that imports its own package (``from alignkit.stages.ppo import core``
            # in stages/ppo/trainer.py) only reaches a package that is already being imported.
            targets = {module_of(target) for target in _imported_names(node, package)
                       if target.split(".")[0] == "alignkit"} - {None, name, *_ancestors(name)}
            if not targets:
                continue
            for target in targets:
                graph[name].add(target)
                # Packages run on the way to the target, unless the importer is inside them.
                graph[name] |= set(_ancestors(target)) - set(_ancestors(name))
            if id(node) in inside_functions:
                in_functions.append((name, node.lineno))
    return graph, in_functions


def _ancestors(module: str) -> list[str]:
    """The packages above ``module``, below ``alignkit`` itself (whose ``__init__`` imports nothing)."""
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(2, len(parts))]


def _function_imports(tree: ast.Module) -> list[ast.stmt]:
    """The import statements of ``tree`` that sit inside a function."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [inner for inner in ast.walk(node) if isinstance(inner, (ast.Import, ast.ImportFrom))]
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_the_graph_sees_imports_at_module_and_function_level_and_packages_on_the_way():
    graph, _ = import_graph()
    assert "alignkit.stages" in graph["alignkit.plan.planner"]  # from alignkit.stages import get_stage
    assert {"alignkit.recipe.settings.judge_text", "alignkit.recipe.settings"} <= graph["alignkit.demo.tasks"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_alignkit_modules():
    graph, _ = import_graph()
    assert circles(graph) == []


def test_function_level_alignkit_imports_are_none():
    # Every alignkit module keeps torch, transformers and trl out of its own import (they load inside the
    # functions that need them), so an alignkit import has no reason to hide inside a function.
    _, in_functions = import_graph()
    assert in_functions == []


def test_settings_import_nothing_of_alignkits_behaviour():
    graph, _ = import_graph()
    # The settings may read the metric names (alignkit.metrics loads a metric's code only when it scores).
    allowed_outside = {"alignkit.errors", "alignkit.suggest", "alignkit.metrics"}
    for module, targets in graph.items():
        if module == "alignkit.recipe.settings" or module.startswith("alignkit.recipe.settings."):
            outside = {t for t in targets if not t.startswith("alignkit.recipe.settings")} - allowed_outside
            assert outside == set(), module


def shadowed_module_imports(source: str) -> list[tuple[str, str]]:
    """(function, name) for each function of ``source`` that binds a name (a parameter or an assignment) equal to
    a module-level ``from alignkit... import <module>`` and also reads an attribute of that name: inside the
    function the name is the local value, so ``module.function(...)`` fails at run time."""
    tree = ast.parse(source)
    imported = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("alignkit") for alias in node.names}
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        arguments = function.args
        bound = {a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]}
        bound |= {node.id for node in ast.walk(function)
                  if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
        for name in sorted(bound & imported):
            if any(isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == name
                   for node in ast.walk(function)):
                found.append((function.name, name))
    return found


def test_no_function_hides_an_imported_alignkit_module_behind_a_local_of_the_same_name():
    # Moving function-level imports to module level turned a parameter named ``generation`` into a shadow of the
    # module ``generation`` in stages/iterative.py: rest and rlaif failed at their first sampling step.
    assert shadowed_module_imports(
        "from alignkit import generation\n"
        "def sample(generation):\n    return generation.generate()\n") == [("sample", "generation")]
    assert shadowed_module_imports("from alignkit import generation\ndef sample(sampling):\n"
                                   "    return generation.generate(sampling)\n") == []
    found = {str(path.relative_to(PACKAGE)): shadowed_module_imports(path.read_text())
             for path in PACKAGE.rglob("*.py")}
    assert {path: pairs for path, pairs in found.items() if pairs} == {}
