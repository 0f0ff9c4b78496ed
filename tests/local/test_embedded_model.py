"""The embedded model: real llama.cpp server, real SmolLM2, real worker."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from medq.core.errors import LocalModelError
from medq.core.schemas import SchemaLoader
from medq.tools.local_model import resolve, server_command
from tests.helpers import run_cli
from worker.extract.processor import MedicalDataProcessor

NOTE = ("Clinic note. 54-year-old woman with hypertension. Amlodipine 5 mg once daily. No known drug allergies. "
        "Never smoker. BP 142/88, HR 76.")


def test_models_are_found_in_their_packages_without_downloading() -> None:
    pytest.importorskip("llama_cpp")
    smol = resolve("smollm2")
    assert smol.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol.path.stat().st_size > 50_000_000
    cmd = server_command(smol, "127.0.0.1", 9999)
    assert cmd[1:3] == ["-m", "llama_cpp.server"] and "--model_alias" in cmd and "smollm2" in cmd
    with pytest.raises(LocalModelError, match="unknown model 'gpt-5'"):
        resolve("gpt-5")
    with pytest.raises(LocalModelError, match="no such GGUF file"):
        resolve("/nowhere/model.gguf")


def test_llm_serve_refuses_a_missing_gguf(tmp_path: Path, medq_env: dict[str, str]) -> None:
    res = run_cli(["llm", "serve", "--model", str(tmp_path / "missing.gguf")], medq_env)
    assert res.returncode == 2 and "no such GGUF file" in res.stderr


def test_missing_extra_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from medq.tools import local_model

    real = importlib.util.find_spec
    monkeypatch.setattr(local_model.importlib.util, "find_spec", lambda name: None if name == "llama_cpp" else real(name))
    with pytest.raises(LocalModelError) as exc:
        local_model.check_server_installed()
    assert 'GGML_NATIVE=OFF' in str(exc.value) and 'pip install -e ".[local]"' in str(exc.value)


def test_processor_gets_schema_valid_output_from_smollm2(llama_server: str) -> None:
    proc = MedicalDataProcessor("smollm2", "sk-local", llama_server, SchemaLoader(), max_tokens=512)
    ex = proc.process(NOTE, "clinical_note", record_id="t1")
    SchemaLoader().get("clinical_note").model.model_validate(ex.data_dict())
    prov = ex.provenance
    # llama-cpp-python refuses json_schema; the processor stepped down to json_object + schema
    assert prov.response_format == "json_object_schema"
    assert prov.llm_calls >= 1 and prov.usage["completion_tokens"] > 0
    assert prov.model == "smollm2"
    assert isinstance(prov.ungrounded_fields, list)


def _stream(url: str, prompt: str, max_tokens: int, started: threading.Event | None = None) -> list[dict[str, Any]]:
    """The chunks of one streamed chat completion; ``started`` is set at its first content."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=300)
    body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    try:
        conn.request("POST", f"{where.path}/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        chunks = []
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            if line[6:].strip() == b"[DONE]":
                break
            chunks.append(json.loads(line[6:]))
            if started is not None and chunks[-1]["choices"][0]["delta"].get("content"):
                started.set()
        return chunks
    finally:
        conn.close()


@pytest.mark.slow
def test_a_queued_request_does_not_cut_a_running_stream(llama_server: str) -> None:
    """llama-cpp-python's server ends a running stream as soon as another request waits
    (--interrupt_requests, on by default): [DONE] with no finish_reason, a cut answer that
    looks whole. medq llm serve turns that off: the second request waits its turn."""
    first_started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_stream, llama_server, "Count from 1 to 300, one number per line.", 200, first_started)
        assert first_started.wait(120)
        second = pool.submit(_stream, llama_server, "Name three colours.", 16)
        a, b = first.result(300), second.result(300)
    assert a[-1]["choices"][0]["finish_reason"] in ("length", "stop"), f"cut after {len(a)} chunks"
    assert b[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_extraction_through_a_real_worker(
    r: redis.Redis, medq_env: dict[str, str], llama_server: str, worker: Callable[..., object], tmp_path: Path
) -> None:
    worker(llama_server, "-c", "1", env={"MEDQ_LLM__MODEL": "smollm2", "MEDQ_LLM__GROUNDING": "drop",
                                         "MEDQ_LLM__TIMEOUT_S": "120", "MEDQ_LLM__MAX_TOKENS": "512"})
    notes = tmp_path / "n.jsonl"
    notes.write_text(json.dumps({"id": "w1", "text": NOTE}) + "\n", encoding="utf-8")
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "llama", "--wait", "--timeout-s", "240"],
                  medq_env, timeout_s=300)
    assert res.returncode in (0, 1), res.stderr
    [doc] = [json.loads(line) for line in run_cli(["results", "llama"], medq_env).stdout.splitlines()]
    assert doc["status"] == "succeeded", doc["error"]
    SchemaLoader().get("clinical_note").model.model_validate(doc["data"])
    assert doc["model"] == "smollm2" and doc["endpoint"] == llama_server
    assert doc["provenance"]["strategy"] == "single"
    assert doc["provenance"]["dropped_fields"] == doc["provenance"]["ungrounded_fields"]


def test_cli_default_is_the_local_models_default() -> None:
    from medq.cli.common import DEFAULT_LOCAL_MODEL
    from medq.tools.local_model import DEFAULT_MODEL, MODELS

    assert DEFAULT_LOCAL_MODEL == DEFAULT_MODEL and DEFAULT_MODEL in MODELS


@pytest.mark.slow
def test_a_long_note_on_the_embedded_model_is_read_in_pieces(
    r: redis.Redis, medq_env: dict[str, str], llama_server: str, worker: Callable[..., object], tmp_path: Path
) -> None:
    """No context setting: llama-cpp-python's server says nothing of its context (4096 here)
    until it refuses the whole note ("maximum context length is 4096 tokens"); the worker
    learns it from that and sends pieces that fit."""
    from tests.helpers import discharge_summary

    worker(llama_server, "-c", "1", env={"MEDQ_LLM__MODEL": "smollm2", "MEDQ_LLM__MAX_IN_FLIGHT": "1",
                                         "MEDQ_LLM__MAX_TOKENS": "512", "MEDQ_LLM__TIMEOUT_S": "120"})
    # 12,000 characters: over the 4096-token context, so read in pieces (the 40,000-character
    # note runs on the simulator, tests/worker/test_long_note_e2e.py)
    note = discharge_summary(12_000)
    notes = tmp_path / "long.jsonl"
    notes.write_text(json.dumps({"id": "long", "text": note}) + "\n", encoding="utf-8")
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "llama-long", "--wait",
                   "--timeout-s", "840"], medq_env, timeout_s=900)
    assert res.returncode in (0, 1), res.stderr
    [doc] = [json.loads(line) for line in run_cli(["results", "llama-long"], medq_env).stdout.splitlines()]
    assert doc["status"] == "succeeded", doc["error"]
    assert doc["provenance"]["pieces"] >= 2 and doc["provenance"]["context_tokens"] == 4096
    SchemaLoader().get("clinical_note").model.model_validate(doc["data"])
    for path, spans in doc["evidence"].items():  # offsets into the whole note
        assert all(0 <= a < b <= len(note) for a, b in spans), path


def test_the_embedded_server_with_default_worker_settings_runs_every_job_once(
    r: redis.Redis, llama_server: str, medq_env: dict[str, str], worker_process: Callable[..., object],
    tmp_path: Path,
) -> None:
    """Issue 24's scene on the real server: llama-cpp-python (one request at a time, no
    /props, refuses json_schema) and a worker with the defaults (no MAX_IN_FLIGHT, no
    CONTEXT_TOKENS, the default TIMEOUT_S of 120 s)."""
    from medq.state.endpoints import endpoint_snapshot

    worker_process(llama_server, "-c", "2", env={"MEDQ_LLM__MODEL": "smollm2", "MEDQ_LLM__TIMEOUT_S": "120"})
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"id": f"n{i}", "text": NOTE.replace("54", str(40 + i))}) + "\n"
                             for i in range(6)), encoding="utf-8")
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "defaults", "--wait",
                   "--timeout-s", "600"], medq_env)
    assert res.returncode == 0, res.stderr
    docs = [json.loads(x) for x in run_cli(["results", "defaults"], medq_env).stdout.splitlines()]
    assert len(docs) == 6 and {d["status"] for d in docs} == {"succeeded"}
    assert [d["attempts"] for d in docs] == [1] * 6 and sum(d["deliveries"] for d in docs) <= 7
    snap = endpoint_snapshot(r, llama_server, 1)
    assert snap["errors"] == 0 and snap["trips"] == 0, snap  # no timeout, no cooling
