"""The package's layout rules (docs/design.md), checked on the import graph.

- layers point down only: a module imports nothing from a higher layer, nor
  from another package of its own layer;
- no import circles between modules, type-only imports included;
- no re-exports outside a package's ``__init__.py``: a name is imported from
  the module that defines it, and a module's ``__all__`` lists only its own names;
- the package root holds ``__init__.py`` and ``cli.py`` only;
- no module much over 400 lines (430 at most).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedpac_hf"

# The layers, lowest first; a module may import from a strictly lower layer only.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("optim", "partition", "data", "metrics"),
    ("federated",),
    ("config", "rundir"),
    ("trainer",),
    ("run", "flower"),
    ("cli",),
    ("__init__",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
ROOT_MODULES = {"__init__.py", "cli.py"}
MAX_LINES = 430


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, importer: str | None) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every ``fedpac_hf`` import in ``path``, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level and importer is not None:
                base = importer.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "fedpac_hf":
                found.append((node.lineno, module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fedpac_hf":
                    found.append((node.lineno, alias.name, []))
    return found


def dependencies(name: str) -> set[str]:
    """The package's modules that module ``name`` imports (a submodule when one is named)."""
    deps = set()
    for _, module, names in imported(MODULES[name], name):
        for item in names or [None]:
            sub = f"{module}.{item}" if item else module
            deps.add(sub if sub in MODULES else module)
    return {d for d in deps if d in MODULES and d != name}


def top_level(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def defined_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_top_level_package_has_a_layer():
    assert {top_level(name) for name in MODULES} <= set(RANK)


def test_layers_point_down_only():
    upward = [
        f"{name} -> {dep}"
        for name in MODULES
        for dep in dependencies(name)
        if top_level(dep) != top_level(name) and RANK[top_level(dep)] >= RANK[top_level(name)]
    ]
    assert not upward, "imports from a higher (or the same) layer: " + "; ".join(sorted(upward))


def test_no_import_circles():
    graph = {name: dependencies(name) for name in MODULES}
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(circles)


def test_names_are_imported_from_the_module_that_defines_them():
    defined = {name: defined_names(path) for name, path in MODULES.items()}
    sources = [p for folder in ("fedpac_hf", "tests", "benchmarks", "examples", "docs")
               for p in sorted((ROOT / folder).rglob("*.py"))]  # fmt: skip
    forwarded = []
    for path in sources:
        importer = module_name(path) if path.is_relative_to(PACKAGE) else None
        for line, module, names in imported(path, importer):
            if module not in MODULES or MODULES[module].name == "__init__.py":
                continue
            for item in names:
                if item not in defined[module] and f"{module}.{item}" not in MODULES:
                    forwarded.append(f"{path.relative_to(ROOT)}:{line} {module}.{item}")
    assert not forwarded, "imported through a module that does not define it: " + "; ".join(
        forwarded
    )


@pytest.mark.parametrize("name", [n for n, p in MODULES.items() if p.name != "__init__.py"])
def test_a_module_exports_only_what_it_defines(name):
    tree = ast.parse(MODULES[name].read_text())
    defined = defined_names(MODULES[name])
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            pytest.fail(f"{name} has a module __getattr__ (a forwarding shim)")
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            foreign = set(ast.literal_eval(node.value)) - defined
            assert not foreign, f"{name}.__all__ lists names defined elsewhere: {sorted(foreign)}"


def test_the_package_root_holds_only_the_public_api_and_the_cli():
    assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES


def test_no_module_is_much_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_public_api_names_resolve_lazily_to_their_defining_modules():
    import fedpac_hf

    assert set(fedpac_hf.__all__) - {"__version__"} == set(fedpac_hf._LAZY)
    for name, module in fedpac_hf._LAZY.items():
        assert getattr(fedpac_hf, name).__module__.startswith(module), name
