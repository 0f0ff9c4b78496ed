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
import tomllib
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


@cache
def _module_imports(name: str) -> frozenset[str]:
    """All imports of a repo module, function-level ones too (a function may run).
    For medq/cli.py only its module-level ones: each command's own are in _cli_roots."""
    path = _module_file(name)
    assert path is not None, name
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if name == "medq.cli":
        return frozenset(m for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) for m in _imports_in(n, name))
    return frozenset(_imports_in(tree, name))


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


def _cli_roots(command: str) -> set[str]:
    """What `medq COMMAND` imports: medq/cli.py's own imports, the command function's,
    and those of the helpers in cli.py it calls; plus what the processes it starts import."""
    tree = ast.parse((REPO / "medq" / "cli" / "__init__.py").read_text(encoding="utf-8"))
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    roots = {"medq.cli"}
    matched = []
    for fn in funcs.values():
        for dec in fn.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "command"):
                continue
            group = {"app": "", "llm_app": "llm ", "schemas_app": "schemas "}[dec.func.value.id]  # type: ignore[attr-defined]
            name = dec.args[0].value if dec.args else fn.name.replace("_", "-")  # type: ignore[attr-defined]
            if f"{group}{name}" == command or group.strip() == command:
                matched.append(fn)
    assert matched, f"README names `medq {command}`, which medq/cli.py does not define"
    todo, done = list(matched), set()
    while todo:
        fn = todo.pop()
        if fn.name in done:
            continue
        done.add(fn.name)
        roots |= _imports_in(fn, "medq.cli")
        todo += [funcs[c.func.id] for c in ast.walk(fn)
                 if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in funcs]
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
    tree = ast.parse((REPO / "medq" / "cli" / "__init__.py").read_text(encoding="utf-8"))
    commands = set()
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        for dec in fn.decorator_list:
            if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "command":
                group = {"app": "", "llm_app": "llm ", "schemas_app": "schemas "}[dec.func.value.id]  # type: ignore[attr-defined]
                commands.add(f"{group}{dec.args[0].value if dec.args else fn.name.replace('_', '-')}")  # type: ignore[attr-defined]
    unnamed = {c for c in commands if c not in named and c.split(" ")[0] not in named}
    assert not unnamed, f"commands missing from README's install table: {sorted(unnamed)}"
    assert any(setting in cell for cell, _ in _install_table() for setting in CONDITIONAL.values())


def test_the_check_catches_a_missing_module() -> None:
    """The check itself: httpx is not installed by the `local` extra (the bug this test exists for)."""
    assert uncovered({"httpx"}, {"local"}) == ["httpx (from httpx)"]
    assert uncovered({"httpx"}, {"dev"}) == []
    assert uncovered({"openai", "aiohttp"}, set()) == ["aiohttp (from aiohttp)", "openai (from openai)"]
