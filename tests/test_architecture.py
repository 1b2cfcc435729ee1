"""The house: imports point down the floors, every module says what it owns, rooms stay small.

The floors (README, Architecture), lowest first. A module may import, at module level,
from its own floor or from floors below it; imports inside functions are how a floor
reaches up on purpose (``compare`` builds a calculator only for static deviations) and
are not checked here.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mace_lpcalc"
MAX_LINES = 420  # "no module over ~400 lines"

# Module name prefixes (dotted, relative to the package) and their floor; the longest
# matching prefix decides. The trajectory format sits below the analysis that reads it,
# the protocols that write it above.
FLOORS = {
    "compat": 0, "units": 0, "timing": 0, "systems": 0, "models": 0, "model_zoo": 0,
    "system_changes": 0,
    "toml_files": 0,
    "precision": 1,
    "fastpath": 2,
    "installed": 3,
    "calculator": 4, "replica_calls": 4,
    "md.frames": 5, "md.topology": 5, "md.trajectory": 5,
    "analysis": 6,
    "md": 7,
    "perf": 8, "training": 8,
    # command-line entry modules
    "__main__": 9, "bench": 9, "compare": 9, "load_test": 9, "profile": 9,
    "sentinel_overhead": 9, "setup_time": 9, "train": 9, "reference": 9, "protocols": 9,
    "mace_tests": 9, "campaign": 9,
}


def floor_of(module: str) -> int:
    parts = module.split(".")
    for length in range(len(parts), 0, -1):
        prefix = ".".join(parts[:length])
        if prefix in FLOORS:
            return FLOORS[prefix]
    raise KeyError(f"module {module!r} is on no floor: add it to FLOORS")


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        if parts:  # the package root re-exports the public API from every floor
            yield ".".join(parts), path


def module_level_imports(tree: ast.Module):
    """Dotted names below ``mace_lpcalc`` imported outside functions and classes."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.If, ast.Try)):
            pending.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ExceptHandler):
            pending.extend(node.body)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mace_lpcalc":
                yield from (alias.name for alias in node.names if alias.name != "__version__")
            elif node.module.startswith("mace_lpcalc."):
                yield node.module.removeprefix("mace_lpcalc.")
        elif isinstance(node, ast.Import):
            yield from (alias.name.removeprefix("mace_lpcalc.") for alias in node.names
                        if alias.name.startswith("mace_lpcalc."))


MODULES = dict(package_modules())


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_floors(module):
    tree = ast.parse(MODULES[module].read_text())
    upward = [target for target in module_level_imports(tree)
              if floor_of(target) > floor_of(module)]
    assert not upward, f"{module} (floor {floor_of(module)}) imports from above: {upward}"


def test_the_floor_check_catches_an_upward_import():
    tree = ast.parse("import numpy\nfrom mace_lpcalc.calculator import X\n"
                     "try:\n    from mace_lpcalc.md.base import Y\nexcept ImportError:\n    pass\n")
    assert sorted(module_level_imports(tree)) == ["calculator", "md.base"]
    assert floor_of("md.base") > floor_of("analysis.report") > floor_of("md.trajectory")
    assert floor_of("fastpath.engine") > floor_of("precision.casting")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_says_what_it_owns_and_stays_small(module):
    source = MODULES[module].read_text()
    if MODULES[module].name != "__init__.py" or source.strip():
        assert ast.get_docstring(ast.parse(source)), f"{module} has no docstring"
    assert source.count("\n") <= MAX_LINES, f"{module} has {source.count(chr(10))} lines"
