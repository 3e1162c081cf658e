"""The package's shape holds: no import cycle between any two modules (imports inside functions count),
no module over 500 lines, no function over 80, no CLI command over 60."""

from __future__ import annotations

import ast
from collections.abc import Iterator

import grimp

from tests.helpers import REPO

PACKAGE = REPO / "bn_inspect"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[module] = min(low[module], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[module])
            if low[module] == index[module]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == module:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph("bn_inspect", exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(module)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.y", imported="a.z")
    assert _cycles(graph) == [["a.x", "a.y"]]


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_COMMAND_LINES = 60


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first decorator to the end: signature and docstring included."""
    end = node.end_lineno or node.lineno
    return end - min([node.lineno, *(d.lineno for d in node.decorator_list)]) + 1


def _is_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any("command" in ast.unparse(decorator) for decorator in node.decorator_list)


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = path.relative_to(REPO)
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in _functions(ast.parse(source)):
            limit = MAX_COMMAND_LINES if _is_command(node) else MAX_FUNCTION_LINES
            if _length(node) > limit:
                too_long.append(f"{name}:{node.lineno} {node.name}: {_length(node)} lines (limit {limit})")
    assert too_long == []


def test_the_size_check_measures_decorators_signature_and_docstring() -> None:
    tree = ast.parse('@app.command("x")\ndef f(\n    a: int,\n) -> None:\n    """Doc."""\n    return None\n')
    node = next(_functions(tree))
    assert (_length(node), _is_command(node)) == (6, True)
