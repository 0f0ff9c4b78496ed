"""What a newcomer reads when something is wrong, and where medq finds its schemas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.helpers import MEDQ, run_cli

pytestmark = pytest.mark.e2e  # what a newcomer sees from the medq process itself


def _notes(path: Path) -> Path:
    path.write_text(json.dumps({"id": "r1", "text": "58-year-old man with gout."}) + "\n", encoding="utf-8")
    return path


def test_bracketed_words_in_an_error_are_printed(r: redis.Redis, medq_env: dict[str, str], tmp_path: Path) -> None:
    """Rich reads [word] as markup and drops it; medq's errors must arrive as written."""
    res = run_cli(["enqueue", str(_notes(tmp_path / "n.jsonl")), "--schema", "ward[a]"], medq_env)
    assert res.returncode == 2
    assert "unknown schema 'ward[a]'" in res.stderr


def test_the_install_hint_keeps_its_extra(medq_env: dict[str, str]) -> None:
    """Without llama-cpp-python, `medq llm serve` says exactly what to install."""
    hide = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] in ('llama_cpp', 'sse_starlette') "
        "else real(name, *a)\n"
        "sys.argv = ['medq', 'llm', 'serve']\n"
        "from medq.cli import main\n"
        "main()\n"
    )
    res = subprocess.run([sys.executable, "-c", hide], env=medq_env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert 'pip install -e ".[local]"' in res.stderr, res.stderr


def test_a_config_file_in_the_working_directory_keeps_the_bundled_schemas(
    r: redis.Redis, medq_env: dict[str, str], tmp_path: Path
) -> None:
    """The README invites users to write ./configs/medq.yaml; the bundled schemas stay,
    and schemas in ./configs/schemas are added to them."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "medq.yaml").write_text("llm:\n  model: qwen2.5:1.5b\n", encoding="utf-8")

    def medq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MEDQ, *args], env=medq_env, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    listed = medq("schemas", "list")
    assert listed.returncode == 0 and "clinical_note" in listed.stdout and "discharge_summary" in listed.stdout
    res = medq("enqueue", str(_notes(tmp_path / "n.jsonl")), "--schema", "clinical_note")
    assert res.returncode == 0, res.stderr
    assert "1 jobs (1 new" in res.stderr

    (tmp_path / "configs" / "schemas").mkdir()
    (tmp_path / "configs" / "schemas" / "wound.yaml").write_text(
        "name: wound\nversion: 1\nfields:\n  site: {type: [string, 'null']}\n", encoding="utf-8"
    )
    listed = medq("schemas", "list")
    assert all(name in listed.stdout for name in ("clinical_note", "discharge_summary", "wound"))
