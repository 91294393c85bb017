"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject.toml), no import cycle at all,
function-level imports that say why they wait, and command modules that import only the standard library.

Imports made inside functions count everywhere here (grimp's import graph has them); imports under
`if TYPE_CHECKING:` do not (they are type hints, never executed).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp
import pytest
from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medfl"


def test_the_import_linter_contracts_are_kept(capsys) -> None:
    status = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert status == EXIT_STATUS_SUCCESS, capsys.readouterr().out


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            module, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.find_modules_directly_imported_by(successor)))))
                    break
                if successor in on_stack:
                    low[module] = min(low[module], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == module:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def _medfl_graph() -> grimp.ImportGraph:
    return grimp.build_graph("medfl", include_external_packages=False, exclude_type_checking_imports=True,
                             cache_dir=None)


def test_no_import_cycle_among_medfl_modules() -> None:
    graph = _medfl_graph()
    assert graph.find_modules_directly_imported_by("medfl.tasks.classification")  # function-level ones included
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_inside_a_layer() -> None:
    graph = _medfl_graph()
    graph.add_import(importer="medfl.data.splits", imported="medfl.data.site")  # data.site imports data.splits
    (cycle,) = _cycles(graph)
    assert {"medfl.data.site", "medfl.data.splits"} <= set(cycle)


def _function_level_imports(path: Path) -> list[tuple[ast.stmt, list[ast.stmt]]]:
    """Every import of a medfl module inside a function, with the statements of the block it stands in."""
    found: list[tuple[ast.stmt, list[ast.stmt]]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for field in ("body", "orelse", "finalbody", "handlers"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            for statement in block:
                if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test):
                    continue
                if in_function and isinstance(statement, (ast.Import, ast.ImportFrom)) and _imports_medfl(statement):
                    found.append((statement, block))
                visit(statement, in_function or isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _imports_medfl(statement: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(statement, ast.ImportFrom):
        return statement.level == 0 and (statement.module or "").split(".")[0] == "medfl"
    return any(alias.name.split(".")[0] == "medfl" for alias in statement.names)


def _says_why(statement: ast.stmt, block: list[ast.stmt], lines: list[str]) -> bool:
    """A comment ends the import's own line(s), or stands on the line above the run of imports it belongs to."""
    if any("#" in lines[number - 1] for number in range(statement.lineno, statement.end_lineno + 1)):
        return True
    first = block.index(statement)
    while first > 0 and isinstance(block[first - 1], (ast.Import, ast.ImportFrom)):
        first -= 1
    above = block[first].lineno - 2  # 0-based index of the line above the run
    while above >= 0 and not lines[above].strip():
        above -= 1
    return above >= 0 and lines[above].strip().startswith("#")


def test_function_level_imports_of_medfl_modules_say_why_they_wait() -> None:
    """Outside the commands (whose rule is package-wide: the standard library only at module level, see
    medfl/commands/__init__.py) an import waits inside a function only for start-up time, and says so."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "commands":
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for statement, block in _function_level_imports(path):
            if not _says_why(statement, block, lines):
                silent.append(f"{path.relative_to(ROOT)}:{statement.lineno}: {ast.unparse(statement)}")
    assert silent == []


def test_the_reason_check_reads_comments_and_nothing_else(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text("def told():\n    x = 1\n    # start-up: torch\n    import os\n    from medfl import errors\n\n"
                      "def silent():\n    x = 1\n    from medfl import errors\n\n"
                      "def trailing():\n    from medfl import errors  # start-up: torch\n")
    lines = source.read_text().splitlines()
    verdicts = [_says_why(statement, block, lines) for statement, block in _function_level_imports(source)]
    assert verdicts == [True, False, True]


def test_command_modules_import_only_the_standard_library_at_module_level() -> None:
    """`medfl --help` and a misspelt key stay fast: commands load medfl, torch and MONAI inside `run`."""
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    foreign = []
    for path in sorted((PACKAGE / "commands").glob("*.py")):
        for statement in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(statement, ast.Import):
                names = [alias.name for alias in statement.names]
            elif isinstance(statement, ast.ImportFrom):
                names = [statement.module or ""]
            else:
                continue
            foreign += [f"{path.name}: {name}" for name in names
                        if name.split(".")[0] not in allowed and name != "medfl.commands"]
    assert foreign == []


def test_docs_draw_every_layer_of_the_contract() -> None:
    tomllib = pytest.importorskip("tomllib")
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
    (layers,) = [contract["layers"] for contract in contracts if contract["type"] == "layers"]
    drawing = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").split("## The layers")[1].split("\n## ")[0]
    missing = [f"medfl.{name.strip()}" for layer in layers for name in layer.split("|")
               if f"medfl.{name.strip()}" not in drawing]
    assert missing == []
