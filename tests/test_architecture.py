"""The package's shape: no import cycle (lazy imports included), and no function over 60 lines unless listed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sid"
MAX_LINES = 60

# Functions over MAX_LINES today, with why they are. The test fails when one of them gets shorter than the limit
# (remove it from here) as well as when a new one appears, so this list can only shrink.
LONG_FUNCTIONS: dict[str, str] = {}


def module_name(path: Path, root: Path) -> str:
    """`sid/data/tasks.py` -> `sid.data.tasks`; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports anywhere in its body (inside functions too), relative imports
    resolved; `import a.b` and `from a import b` (b a module) both count as a.b."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out |= {f"{module}.{alias.name}" for alias in node.names}
    return (out & known) - {name}


def import_graph(root: Path, package: Path) -> dict[str, set[str]]:
    files = sorted(package.rglob("*.py"))
    known = {module_name(f, root) for f in files}
    return {module_name(f, root): imported_modules(f, root, known) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def long_functions(root: Path, package: Path) -> dict[str, int]:
    """`path:qualified.name` -> lines, for every function (methods and nested ones too) over MAX_LINES."""
    out = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = prefix + child.name
                if not isinstance(child, ast.ClassDef) and child.end_lineno - child.lineno + 1 > MAX_LINES:
                    out[qualname] = child.end_lineno - child.lineno + 1
                walk(child, qualname + ".")
            else:
                walk(child, prefix)

    for path in sorted(package.rglob("*.py")):
        walk(ast.parse(path.read_text(), str(path)), path.relative_to(root).as_posix() + ":")
    return out


def test_sid_has_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT, PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_new_function_over_the_limit():
    found = long_functions(ROOT, PACKAGE)
    new = {k: n for k, n in found.items() if k not in LONG_FUNCTIONS}
    assert not new, f"functions over {MAX_LINES} lines (split them, or list them in LONG_FUNCTIONS with why): {new}"
    fixed = sorted(set(LONG_FUNCTIONS) - set(found))
    assert not fixed, f"now at most {MAX_LINES} lines (or gone): remove from LONG_FUNCTIONS: {fixed}"


# The checkers themselves, on tiny packages written for the purpose.
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path / "pkg"


@pytest.mark.parametrize(
    "files, cycle",
    [
        # A lazy import inside a function closes the loop.
        (
            {"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "def f():\n    from pkg.a import x\n"},
            ["pkg.a", "pkg.b", "pkg.a"],
        ),
        # Relative imports, and `from pkg import mod` naming a module.
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from . import b\n",
                "pkg/sub/__init__.py": "",
                "pkg/b.py": "from .sub import c\n",
                "pkg/sub/c.py": "from ..a import y\n",
            },
            ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"],
        ),
        ({"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "import os\n"}, None),
    ],
)
def test_find_cycle_sees_lazy_and_relative_imports(tmp_path, files, cycle):
    package = _package(tmp_path, files)
    assert find_cycle(import_graph(tmp_path, package)) == cycle


def test_long_functions_counts_methods_and_nested_functions(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES - 1))  # def line + 59 lines = 60: allowed
    package = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/m.py": f"def ok():\n{body}\nclass C:\n    def long(self):\n{body.replace('    ', '        ')}"
            "        y = 1\n",
        },
    )
    assert long_functions(tmp_path, package) == {"pkg/m.py:C.long": MAX_LINES + 1}
