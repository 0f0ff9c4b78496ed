"""README "Use the processor from Python": the block runs as written against the simulator."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest

from medq.core.schemas import SchemaLoader
from tests.helpers import REPO

pytestmark = pytest.mark.e2e  # the README block runs in a python process of its own


def _readme_block() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- processor-example: start -->")[1].split("<!-- processor-example: end -->")[0]
    [block] = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return block


def _run(block: str, env: dict[str, str]) -> list[str]:
    # cwd: the block loads configs/schemas relative to a checkout, as a reader runs it
    res = subprocess.run([sys.executable, "-c", block], check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_the_readme_processor_example_prints_the_extraction(simulator: Callable[..., str],
                                                            medq_env: dict[str, str]) -> None:
    block = _readme_block()
    assert 'base_url="http://localhost:11434/v1"' in block
    base_url = simulator()
    script = block.replace("http://localhost:11434/v1", base_url)  # the only change: Ollama -> the simulator

    data_line, evidence_line, provenance_line = _run(script, medq_env)
    data = ast.literal_eval(data_line)
    SchemaLoader([REPO / "configs" / "schemas"]).get("clinical_note").model.model_validate(data)
    assert data["age"] == 72 and data["smoking_status"] == "never"  # read from the note in the block
    evidence = ast.literal_eval(evidence_line)  # where each value is in the block's note
    assert evidence["age"] == [[0, 2]] and evidence["smoking_status"] == [[65, 70]]
    provenance = ast.literal_eval(provenance_line)
    assert provenance["model"] == "qwen2.5:1.5b" and provenance["endpoint"] == base_url
    assert provenance["llm_calls"] == 1 and provenance["usage"]["total_tokens"] > 0

    # the two except branches, as the README says: a 5xx is retryable, invalid answers are permanent
    sim = base_url.removesuffix("/v1")
    httpx.post(f"{sim}/sim/script", json={"outcomes": ["500"]}).raise_for_status()
    [line] = _run(script, medq_env)
    assert line.startswith("try again later: server_error")
    httpx.post(f"{sim}/sim/script", json={"outcomes": ["invalid"] * 3}).raise_for_status()  # first answer + 2 re-asks
    [line] = _run(script, medq_env)
    assert line.startswith("gave up: output_invalid") and "record r1" in line
