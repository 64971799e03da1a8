"""The install is split so that a new user's `make demo` downloads no torch and no CUDA stack.

Structural checks on pyproject.toml and the Makefile (no install is run): the benchmark peers are
neither core dependencies nor reachable from the demo's extra, the demo's make target installs no
test or benchmark extra, and every third-party import of the library is covered: module-level
ones by the core dependencies, lazy ones (inside a function) by some extra.
"""
from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEERS = {"torch", "transformers", "accelerate", "blackjax", "particles"}
LIBRARY = ("smc", "proposals", "targets")
DEMO_EXTRA = "experiments"
# Import names whose distribution is spelled otherwise.
DISTRIBUTION_OF = {"sklearn": "scikit-learn", "yaml": "pyyaml", "tomllib": "tomli"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def self_extras(requirement: str, project: str) -> list[str] | None:
    """The extras of a requirement on the project itself (`smc-scaling[lm]`), else None."""
    match = re.match(r"\s*([A-Za-z0-9._-]+)\s*\[([^\]]*)\]", requirement)
    if match is None or normalize(match.group(1)) != project:
        return None
    return [extra.strip() for extra in match.group(2).split(",")]


@pytest.fixture(scope="module")
def project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def core(project: dict) -> set[str]:
    return {requirement_name(r) for r in project["dependencies"]}


def extra_closure(project: dict, extras: list[str]) -> set[str]:
    """The distributions that `pip install '.[extras]'` adds to the core, self-references
    followed."""
    name, optional = normalize(project["name"]), project["optional-dependencies"]
    seen, todo, found = set(), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"extra {extra!r} is not defined in pyproject.toml"
        for requirement in optional[extra]:
            nested = self_extras(requirement, name)
            if nested is None:
                found.add(requirement_name(requirement))
            else:
                todo.extend(nested)
    return found


# ----------------------------------------------------------------------------- the Makefile
def makefile_rules(text: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(prerequisites, recipe lines) of each target, with `NAME := value` variables expanded."""
    variables: dict[str, str] = {}

    def expand(s: str) -> str:
        for _ in range(10):
            s = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), s)
        return s

    prerequisites: dict[str, list[str]] = {}
    recipes: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("\t"):
            for target in current:
                recipes[target].append(expand(line.strip()))
            continue
        assignment = re.match(r"(\w+)\s*[:?+]?=\s*(.*)$", line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2).strip()
            current = []
            continue
        rule = re.match(r"([^:#=\t][^:=]*):(?!=)(.*)$", line)
        if rule and not line.startswith("."):
            current = expand(rule.group(1)).split()
            for target in current:
                prerequisites[target] = expand(rule.group(2)).replace("|", " ").split()
                recipes[target] = []
        elif line.strip() and not line.startswith("#"):
            current = []
    return prerequisites, recipes


def recipe_of(target: str, prerequisites, recipes) -> list[str]:
    """Every recipe line that `make target` may run, prerequisites included."""
    lines, seen, todo = [], set(), [target]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        lines += recipes.get(name, [])
        todo += prerequisites.get(name, [])
    return lines


def installed_extras(lines: list[str]) -> set[str]:
    extras = set()
    for line in lines:
        if "pip install" in line:
            for group in re.findall(r"\.\[([^\]]*)\]", line):
                extras.update(extra.strip() for extra in group.split(","))
    return extras


@pytest.fixture(scope="module")
def makefile() -> tuple[dict, dict]:
    return makefile_rules((ROOT / "Makefile").read_text())


def test_peers_are_not_core_dependencies(project):
    assert not core(project) & PEERS


def test_peers_are_not_in_the_demo_extra(project):
    assert not extra_closure(project, [DEMO_EXTRA]) & PEERS


def test_peers_are_in_the_bench_extra(project):
    assert PEERS <= extra_closure(project, ["bench"])


def test_make_demo_installs_only_the_demo_extra(makefile):
    lines = recipe_of("demo", *makefile)
    assert any("pip install" in line for line in lines), "make demo installs nothing"
    assert installed_extras(lines) == {DEMO_EXTRA}


def test_make_test_installs_the_peers(makefile, project):
    extras = installed_extras(recipe_of("test", *makefile))
    assert {"dev", "bench"} <= extras
    assert PEERS <= extra_closure(project, sorted(extras))


# ----------------------------------------------------------------------------- the imports
def third_party_imports(package: str) -> tuple[set[str], set[str]]:
    """(module-level, inside a function) top-level names of the non-stdlib, non-first-party
    modules imported at run time anywhere under `package`."""
    first_party = {*LIBRARY, "experiments"}
    top, lazy = set(), set()
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        inside_function, type_checking_only = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inside_function.update(id(n) for n in ast.walk(node) if n is not node)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                type_checking_only.update(id(n) for child in node.body for n in ast.walk(child))
        for node in ast.walk(tree):
            if id(node) in type_checking_only:  # never imported at run time
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root in sys.stdlib_module_names or root in first_party:
                    continue
                (lazy if id(node) in inside_function else top).add(root)
    return top, lazy


def distribution(import_name: str) -> str:
    return normalize(DISTRIBUTION_OF.get(import_name, import_name))


@pytest.mark.parametrize("package", LIBRARY)
def test_library_imports_need_only_the_core_at_import_time(project, package):
    top, lazy = third_party_imports(package)
    assert {distribution(n) for n in top} - core(project) == set()
    every_extra = extra_closure(project, list(project["optional-dependencies"]))
    assert {distribution(n) for n in lazy} - core(project) - every_extra == set()


def test_experiments_imports_are_in_the_demo_extra(project):
    top, _ = third_party_imports("experiments")
    available = core(project) | extra_closure(project, [DEMO_EXTRA])
    assert {distribution(n) for n in top} - available == set()
