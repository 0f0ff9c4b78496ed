"""Every module a command imports is installed by the extras the README names for it.

The README's "What to install" table is the promise (`medq demo` once died on a fresh
machine with ``No module named 'httpx'`` while CI, which installed everything, was
green). This test reads that table, follows each face's imports through the repo
(module-level and function-level, and the processes a command starts), maps every
third-party module to the distribution that provides it, and checks that the
distribution is in what ``pip install -e ".[EXTRAS]"`` resolves to, from
pyproject.toml and the installed packages' own requirements.

``.ci/run`` also proves the two main promises in fresh virtual environments: the
README's first command (``medq demo``) with only its extras, and a producer with
only the base install.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import tomllib
import typer
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from medq.cli import app as cli_app

REPO = Path(__file__).resolve().parent.parent
OURS = ("medq", "worker", "producer")

# Processes a command starts, as the modules they import first.
WORKER_PROCESS = ("worker.celery_app", "worker.tasks")  # celery -A worker.celery_app worker
SPAWNS: dict[str, tuple[str, ...]] = {
    "worker": WORKER_PROCESS,
    "flower": ("flower", *WORKER_PROCESS),  # celery -A worker.celery_app flower
    "demo": ("llama_cpp.server", "sse_starlette", *WORKER_PROCESS),  # the model server and one worker
    "llm serve": ("llama_cpp.server", "sse_starlette"),
    "bench": ("medq.tools.simulator", *WORKER_PROCESS),  # medq llm simulate and workers
}
# Modules reached only under a setting, and the README row that covers that setting.
CONDITIONAL = {"medq.state.results.postgres_store": "MEDQ_RESULTS_URL"}


def _install_table() -> list[tuple[str, set[str]]]:
    """(what the row is for, its extras) for each row of README's "What to install" table."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- extras: start -->(.*?)<!-- extras: end -->", readme, re.S)
    assert block, "README.md has no <!-- extras: start --> ... <!-- extras: end --> table"
    rows = []
    for line in block.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or "pip install" not in cells[1]:
            continue
        m = re.search(r'pip install (?:-e )?"?\.(?:\[([a-z,]+)\])?"?', cells[1])
        assert m, f"cannot read the install command in {cells[1]!r}"
        rows.append((cells[0], set(filter(None, (m.group(1) or "").split(",")))))
    assert rows, "the README's install table has no rows"
    return rows


def _faces(cell: str) -> list[str]:
    """`medq X` and Python entry points named in a row's first cell."""
    return re.findall(r"`([^`]+)`", cell)


# ------------------------------------------------------------------ requirements


@cache
def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def installed_by(extras: frozenset[str]) -> frozenset[str]:
    """Canonical names of every distribution ``pip install -e ".[extras]"`` installs."""
    project = _pyproject()["project"]
    seen: set[str] = set()
    todo = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        todo += [Requirement(r) for r in project["optional-dependencies"][extra]]
    own = canonicalize_name(project["name"])
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == own:  # medq[worker] inside an extra
            for extra in req.extras:
                todo += [Requirement(r) for r in project["optional-dependencies"][extra]]
            continue
        if name in seen and not req.extras:
            continue
        seen.add(name)
        for raw in importlib.metadata.requires(req.name) or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(sub)
    return frozenset(seen)


@cache
def _distributions_of() -> dict[str, list[str]]:
    return {k: [canonicalize_name(d) for d in v] for k, v in importlib.metadata.packages_distributions().items()}


# ------------------------------------------------------------------ imports


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports_in(node: ast.AST, module: str) -> set[str]:
    found: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            found.add(n.module)
            found.update(f"{n.module}.{a.name}" for a in n.names if _module_file(f"{n.module}.{a.name}"))
    return found - {"__future__"}


def _is_cli(name: str) -> bool:
    return name == "medq.cli" or name.startswith("medq.cli.")


@cache
def _parsed(name: str) -> ast.Module:
    path = _module_file(name)
    assert path is not None, name
    return ast.parse(path.read_text(encoding="utf-8"))


def _import_time_imports(tree: ast.Module, module: str) -> set[str]:
    """The imports that run when the module is imported: all but those inside functions."""
    found: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _imports_in(node, module)
        todo.extend(ast.iter_child_nodes(node))
    return found


@cache
def _module_imports(name: str) -> frozenset[str]:
    """All imports of a repo module, function-level ones too (a function may run).
    For the files of medq/cli/ only those that run on import: each command's own, and
    its helpers', are in _cli_roots."""
    if _is_cli(name):
        return frozenset(_import_time_imports(_parsed(name), name))
    return frozenset(_imports_in(_parsed(name), name))


def _closure(roots: set[str], conditional: bool) -> set[str]:
    """Every module imported, directly or through the repo's modules, from ``roots``."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            mod = ".".join(parts[:i])
            if mod in seen or (mod in CONDITIONAL and not conditional):
                continue
            seen.add(mod)
            if parts[0] in OURS and _module_file(mod):
                todo.extend(_module_imports(mod))
    return seen


def _cli_commands() -> dict[str, Callable[..., object]]:
    """Each `medq` command ("enqueue", "llm serve") and its function, as the root app registers them."""
    found: dict[str, Callable[..., object]] = {}

    def walk(app: typer.Typer, prefix: str) -> None:
        for info in app.registered_commands:
            assert info.callback is not None
            # Typer's own default name: the function's, lowercase, "_" -> "-"
            found[prefix + (info.name or info.callback.__name__.lower().replace("_", "-"))] = info.callback
        for group in app.registered_groups:  # a group without a name adds its commands to its parent
            assert group.typer_instance is not None
            walk(group.typer_instance, f"{prefix}{group.name} " if group.name else prefix)

    walk(cli_app, "")
    return found


@cache
def _cli_functions(module: str) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in _parsed(module).body if isinstance(n, ast.FunctionDef)}


@cache
def _cli_names(module: str) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """What a file of medq/cli/ can call: its functions and those it imports from the other
    files, as name -> (module, function); and the files it imports whole, as name -> module."""
    functions = {name: (module, name) for name in _cli_functions(module)}
    modules: dict[str, str] = {}
    for node in _parsed(module).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_cli(node.module):
            for alias in node.names:
                if _module_file(f"{node.module}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif alias.name in _cli_functions(node.module):
                    functions[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            modules.update({alias.asname: alias.name for alias in node.names if alias.asname and _is_cli(alias.name)})
    return functions, modules


def _cli_callees(fn: ast.FunctionDef, module: str) -> list[tuple[str, str]]:
    """The functions of medq/cli/ that ``fn`` names (calls, or passes on), as (module, function)."""
    functions, modules = _cli_names(module)
    found = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and node.id in functions:
            found.append(functions[node.id])
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if node.attr in _cli_functions(modules[node.value.id]):
                found.append((modules[node.value.id], node.attr))
    return found


def _cli_run(command: str) -> set[tuple[str, str]]:
    """The functions `medq COMMAND` may run, as (module, function): the command's own (each of a
    group's, for a group name) and the helpers of medq/cli/ they call, common.py's included."""
    matched = [fn for name, fn in _cli_commands().items() if name == command or name.startswith(f"{command} ")]
    assert matched, f"README names `medq {command}`, which medq/cli/ does not define"
    todo = [(fn.__module__, fn.__name__) for fn in matched]
    done: set[tuple[str, str]] = set()
    while todo:
        key = todo.pop()
        if key not in done:
            done.add(key)
            todo += _cli_callees(_cli_functions(key[0])[key[1]], key[0])
    return done


def _cli_roots(command: str) -> set[str]:
    """What `medq COMMAND` imports: all that importing medq.cli imports (the root imports every
    command file; of those files, their module-level imports), the imports inside the functions
    the command runs; plus what the processes it starts import."""
    roots = {"medq.cli"}
    for module, name in _cli_run(command):
        roots |= {module} | _imports_in(_cli_functions(module)[name], module)
    for spawned, modules in SPAWNS.items():
        if command == spawned:
            roots |= set(modules)
    return roots


def _roots(face: str) -> set[str]:
    if face.startswith("medq "):
        return _cli_roots(face.removeprefix("medq ").strip())
    m = re.fullmatch(r"from ([\w.]+) import \w+", face)
    if m:
        return {m.group(1)}
    if face == "MedicalDataProcessor":
        return {"worker.extract.processor"}
    raise AssertionError(f"the install table names {face!r}; tests/test_extras.py does not know what it imports")


def uncovered(modules: set[str], extras: set[str]) -> list[str]:
    """Third-party modules that ``.[extras]`` does not install, with who provides them."""
    have = installed_by(frozenset(extras))
    missing = []
    for top in sorted({m.split(".")[0] for m in modules}):
        if top in OURS or top in sys.stdlib_module_names:
            continue
        dists = _distributions_of().get(top)
        if not dists:
            missing.append(f"{top} (not installed here at all)")
        elif not any(d in have for d in dists):
            missing.append(f"{top} (from {', '.join(sorted(set(dists)))})")
    return missing


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize(
    "row, extras",
    [pytest.param(cell, extras, id=(",".join(sorted(extras)) or "base")) for cell, extras in _install_table()],
)
def test_each_face_needs_only_the_extras_the_readme_names(row: str, extras: set[str]) -> None:
    faces = [f for f in _faces(row) if f.startswith(("medq ", "from ")) or f == "MedicalDataProcessor"]
    problems = {}
    for face in faces:
        missing = uncovered(_closure(_roots(face), conditional=False), extras)
        if missing:
            problems[face] = missing
    for module, setting in CONDITIONAL.items():
        if setting in row:
            missing = uncovered(_closure({module}, conditional=True), extras)
            if missing:
                problems[module] = missing
    assert not problems, f"README says {sorted(extras) or 'the base install'} is enough, but: {problems}"


def test_every_command_has_a_row() -> None:
    named = {f.removeprefix("medq ").strip() for cell, _ in _install_table() for f in _faces(cell) if f.startswith("medq ")}
    commands = set(_cli_commands())
    unnamed = {c for c in commands if c not in named and c.split(" ")[0] not in named}
    assert not unnamed, f"commands missing from README's install table: {sorted(unnamed)}"
    assert any(setting in cell for cell, _ in _install_table() for setting in CONDITIONAL.values())


def test_the_check_catches_a_missing_module() -> None:
    """The check itself: selenium is not installed by the `local` extra (as httpx was not, the bug
    this test exists for; httpx is now only in `dev`, for the tests)."""
    assert uncovered({"selenium"}, {"local"}) == ["selenium (from selenium)"]
    assert uncovered({"selenium"}, {"dev"}) == []
    assert uncovered({"openai", "aiohttp"}, set()) == ["aiohttp (from aiohttp)", "openai (from openai)"]


def test_the_cli_is_read_whole() -> None:
    """The reading of medq/cli/ itself: loading it loads every command file, so their module-level
    imports count for every command; a function's own imports count for the commands that run it."""
    enqueue = _closure(_cli_roots("enqueue"), conditional=False)
    assert {"medq.cli.demo", "medq.cli.llm", "producer.enqueue"} <= enqueue
    assert {("medq.cli.jobs", "_wait"), ("medq.cli.common", "fail")} <= _cli_run("enqueue")
    assert ("medq.cli.common", "read_gold") in _cli_run("eval")
    assert "medq.tools.demo" not in enqueue
    assert "medq.tools.demo" in _closure(_cli_roots("demo"), conditional=False)
    assert {"llm serve", "llm simulate", "schemas list", "schemas show", "eval"} <= set(_cli_commands())
