"""What an endpoint can make medq leak, and what it cannot.

- An endpoint whose error body echoes the request (vLLM, llama.cpp and proxies do):
  the note never reaches a job state, Celery, the log or the CLI, because medq says
  what a server said in kind only (status, error type, a digest), never its words.
- An endpoint that redirects: medq does not follow, so the note never reaches the
  host the privacy guard did not approve.
- An endpoint URL with credentials: the password is sent, and shown nowhere.

Each runs a real worker against HTTP servers of the test's own on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from medq.core.errors import EndpointMisconfigured, RequestRejected
from tests.helpers import (
    CHINESE,
    ESCAPED,
    MEDQ,
    MODELS,
    NEEDLES,
    SHORT_LINES,
    Proc,
    Server,
    echo,
    free_port,
    hits,
    redis_hits,
    run_cli,
    wait_http,
)
from worker.llm.client import FormatRejected, LLMClient, error_for_status

PASSWORD = "s3cretpw"


def _notes(path: Path, notes: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n" for k, v in notes.items()),
                    encoding="utf-8")
    return path


def _results(env: dict[str, str], batch: str) -> dict[str, dict[str, Any]]:
    res = run_cli(["results", batch], env)
    assert res.returncode == 0, res.stderr
    return {d["id"]: d for d in map(json.loads, res.stdout.splitlines())}


# ---------------------------------------------------------------- error text


def test_an_error_message_says_what_the_server_said_in_kind_never_its_words() -> None:
    note = "Mr Tan\nBP 150/95"
    body = json.dumps({"error": {"message": f"bad request: {note}", "type": "invalid_request_error",
                                 "code": "not a name: has spaces"}}).encode()
    err = error_for_status(400, {}, body, "http://127.0.0.1:1/v1")
    digest = hashlib.sha256(body).hexdigest()[:12]
    assert type(err) is RequestRejected
    assert err.message == f"HTTP 400 from http://127.0.0.1:1/v1 (type invalid_request_error, body sha256 {digest})"
    # TGI's plain-text refusal still classifies, by words that are not repeated
    tgi = error_for_status(422, {}, "Failed to deserialize: response_format: unknown variant", "http://tgi/v1")
    assert type(tgi) is FormatRejected and "unknown variant" not in tgi.message
    assert "the response_format was refused" in tgi.message


def test_an_endpoint_that_echoes_the_request_leaks_no_note(
    r: redis.Redis, medq_env: dict[str, str], worker_process: Callable[..., Proc], servers: Callable[..., Server],
    tmp_path: Path,
) -> None:
    key = run_cli(["keygen"], medq_env).stdout.strip()
    env = {**medq_env, "MEDQ_ENCRYPTION_KEY": key}
    echoer = servers(echo)
    proc = worker_process(echoer.base, "--loglevel", "DEBUG", env={"MEDQ_ENCRYPTION_KEY": key})
    notes = _notes(tmp_path / "notes.jsonl", {"short": SHORT_LINES, "zh": CHINESE, "esc": ESCAPED})
    waited = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "echo", "--wait",
                      "--timeout-s", "90"], env)
    assert waited.returncode == 1, waited.stderr  # every job refused

    # the server did get the notes, and did quote them back
    posted = [json.loads(b) for method, _, _, b in echoer.requests if method == "POST"]
    assert any(SHORT_LINES in m["content"] for p in posted for m in p["messages"])
    docs = _results(env, "echo")
    assert {d["status"] for d in docs.values()} == {"failed"}
    for d in docs.values():
        assert d["error"]["kind"] == "request_rejected"
        assert re.fullmatch(rf"HTTP 400 from {re.escape(echoer.base)} \(body sha256 [0-9a-f]{{12}}\)", d["error"]["message"])

    failed = run_cli(["failed", "echo", "--json"], env)
    results = run_cli(["results", "echo"], env)
    assert failed.returncode == 0 and len(failed.stdout.splitlines()) == 3
    assert r.keys("celery-task-meta-*"), "the Celery result backend was checked"
    assert "failed: request_rejected" in proc.log or "request_rejected" in proc.log  # the log is real
    places = {"worker log": proc.log, "medq failed": failed.stdout + failed.stderr,
              "medq results": results.stdout + results.stderr, "enqueue --wait": waited.stdout + waited.stderr}
    assert {k: hits(v, NEEDLES) for k, v in places.items() if hits(v, NEEDLES)} == {}
    assert redis_hits(r, NEEDLES) == {}


# ---------------------------------------------------------------- redirects


def test_a_redirecting_endpoint_does_not_get_the_note_sent_elsewhere(
    r: redis.Redis, medq_env: dict[str, str], worker: Callable[..., Proc], servers: Callable[..., Server],
    tmp_path: Path,
) -> None:
    elsewhere = servers(lambda h, b: (200, {}, MODELS) if h.command == "GET" else (400, {}, b"{}"))
    port = elsewhere.httpd.server_port
    redirect = servers(lambda h, b: (307, {"Location": f"http://127.0.0.1:{port}{h.path}"}, b""))
    worker(redirect.base)
    notes = _notes(tmp_path / "notes.jsonl", {"r1": SHORT_LINES})
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "redir", "--wait",
                   "--timeout-s", "90"], medq_env)
    assert res.returncode == 1, res.stderr

    assert any(method == "POST" for method, *_ in redirect.requests)  # the job did ask the approved endpoint
    assert elsewhere.requests == []  # and nothing, note or probe, went where it pointed
    [doc] = _results(medq_env, "redir").values()
    assert doc["status"] == "failed" and doc["error"]["kind"] == "endpoint_misconfigured"
    assert doc["error"]["message"].startswith(
        f"HTTP 307 from {redirect.base}: medq does not follow redirects on model calls; "
        "point MEDQ_LLM__BASE_URL (or the endpoint in MEDQ_LLM__ENDPOINTS) at the final address"
    )
    # the blocking path (the start-up model check, MedicalDataProcessor.process) does not follow either
    with pytest.raises(EndpointMisconfigured, match="HTTP 307"):
        LLMClient(redirect.base, "x", "m").complete([{"role": "user", "content": "hi"}], response_format=None,
                                                    max_tokens=1, temperature=0.0)
    assert elsewhere.requests == []


# ---------------------------------------------------------------- credentials in the URL


def test_credentials_in_the_endpoint_url_are_sent_and_shown_nowhere(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., Proc],
    start_process: Callable[..., Proc], tmp_path: Path,
) -> None:
    sim = simulator()
    base = sim.replace("http://", f"http://user:{PASSWORD}@")
    shown = sim.replace("http://", "http://***@")
    env = {**medq_env, "MEDQ_LLM__BASE_URL": base, "MEDQ_WORKER__MAX_RETRIES": "1"}
    proc = worker(base, "--loglevel", "DEBUG", env={"MEDQ_WORKER__MAX_RETRIES": "1"})
    notes = _notes(tmp_path / "notes.jsonl", {f"c{i}": f"Mr C{i} is a {60 + i}-year-old man with asthma." for i in range(3)})
    assert run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "cred", "--wait",
                    "--timeout-s", "90"], env).returncode == 0
    docs = _results(env, "cred")
    assert {d["status"] for d in docs.values()} == {"succeeded"}
    assert {d["endpoint"] for d in docs.values()} == {shown}
    assert {d["provenance"]["endpoint"] for d in docs.values() if "endpoint" in d["provenance"]} <= {shown}

    # an error: two 500s spend the retry budget of one job; its message names the endpoint, redacted
    httpx.post(sim.removesuffix("/v1") + "/sim/script", json={"outcomes": ["500", "500"]}).raise_for_status()
    one = _notes(tmp_path / "one.jsonl", {"e1": "Mrs E is 70 and has gout."})
    assert run_cli(["enqueue", str(one), "--schema", "clinical_note", "--batch", "cred-err", "--wait",
                    "--timeout-s", "90"], env).returncode == 1
    [failed_doc] = _results(env, "cred-err").values()
    assert failed_doc["error"]["kind"] == "server_error"
    assert failed_doc["error"]["message"].startswith(f"HTTP 500 from {shown} (")

    port = free_port()
    exporter = start_process([MEDQ, "metrics", "--port", str(port)], env, name="metrics")
    wait_http(f"http://127.0.0.1:{port}/metrics", exporter)
    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert f'endpoint="{shown}"' in scraped  # the label is there, redacted
    endpoints = run_cli(["endpoints", "--json"], env)
    assert endpoints.returncode == 0 and json.loads(endpoints.stdout.splitlines()[0])["url"] == shown
    places = {
        "medq results": run_cli(["results", "cred"], env).stdout + run_cli(["results", "cred-err"], env).stdout,
        "medq failed": run_cli(["failed", "cred-err", "--json"], env).stdout,
        "medq endpoints --json": endpoints.stdout + endpoints.stderr,
        "medq metrics /metrics": scraped,
        "worker log": proc.log,
    }
    assert [k for k, v in places.items() if PASSWORD in v] == []
    assert redis_hits(r, (PASSWORD,)) == {}


def test_credentials_in_the_url_authenticate_both_clients(servers: Callable[..., Server]) -> None:
    answer = json.dumps({"model": "m", "choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
    seen = servers(lambda h, b: (200, {}, answer))
    url = seen.base.replace("http://", f"http://user:{PASSWORD}@")
    messages = [{"role": "user", "content": "hi"}]
    LLMClient(url, "sk-x", "m").complete(messages, response_format=None, max_tokens=1, temperature=0.0)

    import asyncio

    from worker.llm.client import AsyncLLMClient

    async def engine_call() -> None:
        client = AsyncLLMClient(url, "sk-x", "m")
        try:
            await client.complete(messages, response_format=None, max_tokens=1, temperature=0.0)
        finally:
            await client.close()

    asyncio.run(engine_call())
    basic = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()
    assert [h.get("authorization") for _, _, h, _ in seen.requests] == [basic, basic]
    assert all(path == "/v1/chat/completions" for _, path, _, _ in seen.requests)
