"""An endpoint set up wrong for medq: a model it does not serve, a context too small
for the note. Real workers, the real CLI, the simulator playing Ollama."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from tests.helpers import MEDQ, Proc, free_port, run_cli, wait_http, wait_log

SHORT = "Patient is a 64-year-old man with hypertension on amlodipine 5 mg."
# About 20,000 characters: with medq's prompt, far past a 2,048-token context.
LONG = ("History: seen yearly in clinic, blood pressure reviewed, no change to treatment. " * 250
        + "Now a 71-year-old woman with asthma.")


def _write(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in records.items()), encoding="utf-8")
    return path


def _results(env: dict[str, str], batch: str) -> dict[str, dict]:
    res = run_cli(["results", batch], env)
    assert res.returncode == 0, res.stderr
    return {d["id"]: d for d in map(json.loads, res.stdout.splitlines())}


def _enqueue_wait(env: dict[str, str], path: Path, batch: str) -> int:
    res = run_cli(["enqueue", str(path), "--schema", "clinical_note", "--batch", batch, "--wait", "--timeout-s", "90"], env)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode


def test_a_note_the_server_cut_to_its_context_is_read_again_in_pieces(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., Proc], tmp_path: Path
) -> None:
    base = simulator("--context-tokens", "2048")  # Ollama's old default, which cuts without an error
    worker(base)
    notes = _write(tmp_path / "notes.jsonl", {"short": SHORT, "long": LONG})
    assert _enqueue_wait(medq_env, notes, "ctx") == 0

    docs = _results(medq_env, "ctx")
    assert docs["short"]["status"] == "succeeded" and docs["short"]["data"]["age"] == 64
    long = docs["long"]
    assert long["status"] == "succeeded" and long["attempts"] == 1
    # not an extraction from the part the server kept: the end of the note was read too
    assert long["data"]["age"] == 71 and long["provenance"]["pieces"] > 5
    assert long["provenance"]["context_tokens"] == 2048


def test_a_context_too_small_for_the_prompt_fails_and_requeue_takes_it_once_fixed(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., Proc], tmp_path: Path
) -> None:
    base = simulator("--context-tokens", "300")
    proc = worker(base)
    notes = _write(tmp_path / "notes.jsonl", {"long": LONG})
    assert _enqueue_wait(medq_env, notes, "tiny") == 1
    long = _results(medq_env, "tiny")["long"]
    assert long["status"] == "failed" and long["data"] is None
    assert long["error"]["kind"] == "endpoint_misconfigured" and long["attempts"] == 1
    message = long["error"]["message"]
    assert message.startswith("record long: ") and "context of 300 tokens leaves no room" in message
    assert "OLLAMA_CONTEXT_LENGTH" in message and "llama-server -c" in message
    assert "clinic" not in message and "clinic" not in proc.log  # names the record, never its text

    [row] = [json.loads(line) for line in run_cli(["failed", "tiny", "--json"], medq_env).stdout.splitlines()]
    assert row["record_id"] == "long" and row["error_kind"] == "endpoint_misconfigured"
    # fixed by giving the server more context: plain requeue takes it
    assert "requeued 1 job(s)" in run_cli(["requeue", "tiny"], medq_env).stderr


def test_worker_does_not_start_with_a_model_the_endpoint_does_not_serve(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., Proc],
    start_process: Callable[..., Proc], tmp_path: Path,
) -> None:
    base = simulator("--served-model", "qwen2.5:1.5b")
    wrong = {**medq_env, "MEDQ_LLM__BASE_URL": base, "MEDQ_LLM__MODEL": "qwen2.5"}
    proc = start_process([MEDQ, "worker", "-c", "1"], wrong, name="worker-wrong-model")
    assert proc.popen.wait(60) != 0
    assert f'{base} does not serve model "qwen2.5" (it serves: qwen2.5:1.5b)' in proc.log
    assert "set MEDQ_LLM__MODEL" in proc.log and " ready." not in proc.log

    shown = run_cli(["endpoints"], {**wrong, "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "not served (serves: qwen2.5:1.5b)" in " ".join(shown.stdout.split())
    [row] = [json.loads(line) for line in run_cli(["endpoints", "--json"], wrong).stdout.splitlines()]
    assert row["url"] == base
    assert row["model"] == {"name": "qwen2.5", "status": "not_served", "served": ["qwen2.5:1.5b"], "reason": ""}

    # the name it serves: the check passes and jobs run
    right = {**medq_env, "MEDQ_LLM__MODEL": "qwen2.5:1.5b"}
    [row] = [json.loads(line) for line in run_cli(["endpoints", "--json"], {**right, "MEDQ_LLM__BASE_URL": base}).stdout.splitlines()]
    assert row["model"]["status"] == "ok"
    worker(base, env={"MEDQ_LLM__MODEL": "qwen2.5:1.5b"})
    assert _enqueue_wait(right, _write(tmp_path / "one.jsonl", {"a": SHORT}), "right") == 0
    assert _results(right, "right")["a"]["model"] == "qwen2.5:1.5b"


def test_a_server_that_takes_any_name_passes_and_one_that_is_down_is_only_a_warning(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker_process: Callable[..., Proc]
) -> None:
    # llama-cpp-python's server lists one model under its own name and takes any name:
    # not being listed is not an error, the one-token probe says so
    base = simulator()
    env = {**medq_env, "MEDQ_LLM__BASE_URL": base, "MEDQ_LLM__MODEL": "my-local-model"}
    [row] = [json.loads(line) for line in run_cli(["endpoints", "--json"], env).stdout.splitlines()]
    assert row["model"] == {"name": "my-local-model", "status": "ok", "served": ["medq-simulator"], "reason": ""}
    assert httpx.get(base.removesuffix("/v1") + "/stats").json()["max_tokens"] == [1]

    down = f"http://127.0.0.1:{free_port()}/v1"
    proc = worker_process(down)  # starts: the endpoint may come up later
    assert f"cannot reach {down} to check model" in proc.log
    [row] = [json.loads(line) for line in run_cli(["endpoints", "--json"], {**medq_env, "MEDQ_LLM__BASE_URL": down}).stdout.splitlines()]
    assert row["model"]["status"] == "unreachable"


def _start_sim(start_process: Callable[..., Proc], env: dict[str, str], port: int, model: str) -> Proc:
    proc = start_process([MEDQ, "llm", "simulate", "--port", str(port), "--served-model", model], env, name="simulator")
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
    return proc


def test_a_model_gone_after_start_fails_jobs_as_model_not_found_and_requeue_runs_them(
    r: redis.Redis, medq_env: dict[str, str], worker: Callable[..., Proc], start_process: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    sim = _start_sim(start_process, medq_env, port, "qwen2.5:1.5b")
    proc = worker(base, env={"MEDQ_LLM__MODEL": "qwen2.5:1.5b"})
    env = {**medq_env, "MEDQ_LLM__MODEL": "qwen2.5:1.5b"}

    # the server is restarted with another model (someone ran `ollama rm`)
    sim.stop()
    sim = _start_sim(start_process, medq_env, port, "llama3.2:1b")
    notes = _write(tmp_path / "notes.jsonl", {"a": SHORT, "b": SHORT.replace("64", "65")})
    assert _enqueue_wait(env, notes, "gone") == 1
    docs = _results(env, "gone")
    for d in docs.values():
        assert d["status"] == "failed" and d["error"]["kind"] == "model_not_found"
        assert 'model "qwen2.5:1.5b" not found' in d["error"]["message"] and "MEDQ_LLM__MODEL" in d["error"]["message"]
    wait_log(proc, "failed: model_not_found")

    # the model is back: plain requeue (no --all-failed) runs them again
    sim.stop()
    _start_sim(start_process, medq_env, port, "qwen2.5:1.5b")
    assert "requeued 2 job(s)" in run_cli(["requeue", "gone"], env).stderr
    assert _enqueue_wait(env, notes, "gone") == 0
    assert {d["status"] for d in _results(env, "gone").values()} == {"succeeded"}
