"""What endpoints say about their context: a refusal read as ContextExceeded, and the
limits learned at worker start (worker.llm.facts) from the simulator and from a
stand-in for Ollama's own API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from medq.core.errors import ContextExceeded, PermanentError, RequestRejected
from medq.tools.simulator import LLAMA_CPP_JSON_SCHEMA_REFUSAL
from tests.helpers import MEDQ, REPO, Proc, free_port, wait_http
from worker.llm.client import AsyncLLMClient, FormatRejected, LLMClient, error_for_status
from worker.llm.facts import EndpointFacts, learn_endpoint

# A word that stands for the note: no message medq makes may repeat it.
CANARY = "Zebrafishcanary"
WHERE = "http://gpu1:8080/v1"

VLLM_MESSAGE = (
    "This model's maximum context length is 2048 tokens. However, you requested 3100 tokens "
    f"(3000 in the messages, 100 in the completion). Please reduce the length of the messages or completion. {CANARY}"
)

# (server, status, body, the context size it names or 0)
REFUSALS: list[tuple[str, int, Any, int]] = [
    (
        "llama.cpp server",
        400,
        {"error": {"code": 400, "message": f"the request exceeds the available context size, try increasing it {CANARY}",
                   "type": "exceed_context_size_error", "n_prompt_tokens": 5000, "n_ctx": 4096}},
        4096,
    ),
    (
        "llama.cpp server, newer wording, n_ctx left out",
        400,
        {"error": {"code": 400, "type": "exceed_context_size_error",
                   "message": f"request (9412 tokens) exceeds the available context size (8192 tokens), try increasing it {CANARY}"}},
        8192,
    ),
    (
        "llama-cpp-python server",
        400,
        {"error": {"message": VLLM_MESSAGE, "type": "invalid_request_error", "param": "messages",
                   "code": "context_length_exceeded"}},
        2048,
    ),
    ("vLLM", 400, {"object": "error", "message": VLLM_MESSAGE, "type": "BadRequestError", "param": None, "code": 400}, 2048),
    (
        "vLLM, error object",
        400,
        {"error": {"message": VLLM_MESSAGE, "type": "BadRequestError", "param": None, "code": 400}},
        2048,
    ),
    (
        "vLLM, older wording",
        400,
        {"object": "error", "type": "BadRequestError", "code": 400,
         "message": f"The decoder prompt (length 3000) is longer than the maximum model length of 2048. {CANARY}"},
        2048,
    ),
    (
        "OpenAI, code only",
        400,
        {"error": {"message": f"Too long: {CANARY}", "type": "invalid_request_error", "code": "context_length_exceeded"}},
        0,
    ),
    (
        "TGI",
        422,
        {"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048. Given: 3000 `inputs` "
                  f"tokens and 100 `max_new_tokens` {CANARY}", "error_type": "validation"},
        2048,
    ),
    (
        "TGI, inputs alone",
        422,
        {"error": f"Input validation error: `inputs` must have less than 4096 tokens. Given: 5000 {CANARY}",
         "error_type": "validation"},
        4096,
    ),
    (
        "a quoted prompt that says schema",  # before the "schema" test that means a refused format
        400,
        {"error": {"message": f"context length 4096 exceeded by the prompt 'JSON Schema: {{...}} {CANARY}'"}},
        4096,
    ),
    ("generic, context window", 400, {"error": {"message": f"prompt exceeds the context window {CANARY}"}}, 0),
    ("generic, 413 as plain text", 413, f"context length exceeded: {CANARY}", 0),
]


@pytest.mark.parametrize(("server", "status", "body", "size"), REFUSALS, ids=[r[0] for r in REFUSALS])
@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes", "parsed"])
def test_a_prompt_longer_than_the_context_is_context_exceeded(
    server: str, status: int, body: Any, size: int, as_bytes: bool
) -> None:
    raw = (body if isinstance(body, str) else json.dumps(body)).encode() if as_bytes else body
    err = error_for_status(status, {}, raw, WHERE)
    assert type(err) is ContextExceeded
    assert err.context_tokens == size
    assert isinstance(err, PermanentError)  # not retried: the same prompt gets the same answer
    message = str(err)
    assert f"HTTP {status} from {WHERE}" in message
    assert (f"({size} tokens)" if size else "(size not given)") in message
    # the server's words stay out: its message may quote the note
    assert CANARY.lower() not in message.lower()
    for word in ("However", "exceeds", "Input validation", "decoder"):
        assert word not in message


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # llama-cpp-python's refusal of json_schema: about response_format, not the context
        (500, {"error": {"message": LLAMA_CPP_JSON_SCHEMA_REFUSAL, "type": "internal_server_error"}}, FormatRejected),
        (400, {"error": {"message": LLAMA_CPP_JSON_SCHEMA_REFUSAL}}, FormatRejected),
        (400, {"error": {"message": "invalid json schema: unsupported keyword"}}, FormatRejected),
        (400, {"error": {"message": "max_tokens is too large"}}, RequestRejected),
        # a server failing is not a context it refused
        (500, {"error": {"message": "context size computation failed"}}, None),
    ],
)
def test_other_refusals_are_not_context_exceeded(status: int, body: Any, expected: type | None) -> None:
    err = error_for_status(status, {}, json.dumps(body).encode(), WHERE)
    assert not isinstance(err, ContextExceeded)
    if expected is not None:
        assert type(err) is expected


# ------------------------------------------------------------ the simulator


def launch(flags: list[str], log_path: Path) -> tuple[Proc, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQ_")}
    with open(log_path, "wb") as fh:
        popen = subprocess.Popen(
            [MEDQ, "llm", "simulate", "--host", "127.0.0.1", "--port", str(port), *flags],
            env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )
    return Proc(popen, log_path), f"http://127.0.0.1:{port}/v1"


SIM_FLAGS = {
    "advertised": ["--context-tokens", "3000", "--advertise-context", "--parallel", "3", "--context-overflow", "refuse"],
    "plain": [],
}


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Base URLs of the two simulators, started together (each start imports FastAPI)."""
    log_dir = tmp_path_factory.mktemp("simulators")
    started = {name: launch(flags, log_dir / f"{name}.log") for name, flags in SIM_FLAGS.items()}
    try:
        for proc, url in started.values():
            wait_http(f"{url}/models", proc)
        yield {name: url for name, (_, url) in started.items()}
    finally:
        for proc, _ in started.values():
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc, _ in started.values():
            proc.stop()


# About 4,000 tokens by the simulator's estimate: more than its 3,000.
LONG_PROMPT = [{"role": "user", "content": f"Seen in clinic for review, {CANARY}. " * 450}]


def test_the_simulators_refusal_reaches_the_client_as_context_exceeded(sims: dict[str, str]) -> None:
    client = LLMClient(sims["advertised"], "x", "medq-simulator", timeout_s=10)
    with pytest.raises(ContextExceeded) as caught:
        client.complete(LONG_PROMPT, response_format=None, max_tokens=16, temperature=0.0)
    assert caught.value.context_tokens == 3000
    assert CANARY.lower() not in str(caught.value).lower()
    # a prompt that fits is answered
    fits = client.complete([{"role": "user", "content": "A short note."}], response_format=None, max_tokens=16,
                           temperature=0.0)
    assert fits.prompt_tokens < 3000


def test_the_engine_client_reads_the_refusal_the_same(sims: dict[str, str]) -> None:
    async def call() -> None:
        client = AsyncLLMClient(sims["advertised"], "x", "medq-simulator", timeout_s=10)
        try:
            await client.complete(LONG_PROMPT, response_format=None, max_tokens=16, temperature=0.0)
        finally:
            await client.close()

    with pytest.raises(ContextExceeded) as caught:
        asyncio.run(call())
    assert caught.value.context_tokens == 3000


def test_learns_context_and_slots_from_an_advertising_server(sims: dict[str, str]) -> None:
    facts = learn_endpoint(sims["advertised"], "x", "medq-simulator")
    # max_model_len is asked first; the slots only /props says
    assert facts == EndpointFacts(context_tokens=3000, parallel=3, source="max_model_len")
    assert facts.describe() == "context 3000 tokens (max_model_len), 3 slots"


def test_learns_nothing_from_a_server_that_says_nothing(sims: dict[str, str]) -> None:
    facts = learn_endpoint(sims["plain"], "x", "medq-simulator")
    assert facts == EndpointFacts()
    assert facts.describe() == "nothing said"


def test_learns_nothing_fast_from_an_unreachable_url() -> None:
    started = time.monotonic()
    assert learn_endpoint(f"http://127.0.0.1:{free_port()}/v1", "x", "m") == EndpointFacts()
    assert time.monotonic() - started < 1


def test_a_server_that_never_answers_costs_the_timeout_once() -> None:
    with socket.socket() as listener:  # connections wait in the backlog, never answered
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        started = time.monotonic()
        facts = learn_endpoint(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", "x", "m", timeout_s=0.5)
    assert facts == EndpointFacts()
    assert time.monotonic() - started < 1.5  # not 0.5 s per probe


# ------------------------------------------------------------ stand-in servers


Route = tuple[int, Any]  # status, JSON body (or bytes as they are)


class FakeServer:
    """A stdlib HTTP server answering fixed routes, recording what it was asked."""

    def __init__(self, routes: dict[tuple[str, str], Route]) -> None:
        self.routes = routes
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.answer("GET")

            def do_POST(self) -> None:
                self.answer("POST")

            def answer(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fake.requests.append({"method": method, "path": self.path, "headers": dict(self.headers), "body": body})
                status, payload = fake.routes.get((method, self.path), (404, {"error": "not found"}))
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                if status in (301, 302, 307, 308):
                    self.send_header("Location", f"http://127.0.0.1:{fake.port}/elsewhere")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        return [f"{r['method']} {r['path']}" for r in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server() -> Iterator[Callable[[dict[tuple[str, str], Route]], FakeServer]]:
    servers: list[FakeServer] = []

    def start(routes: dict[tuple[str, str], Route]) -> FakeServer:
        servers.append(FakeServer(routes))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


MODEL = "qwen2.5:1.5b"
OPENAI_MODELS = (200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "library"}]})
OLLAMA_PS = (200, {"models": [{"name": MODEL, "model": MODEL, "size": 1, "digest": "abc", "context_length": 8192,
                               "expires_at": "2025-01-01T00:00:00Z", "size_vram": 1}]})
OLLAMA_SHOW = (200, {"parameters": 'num_ctx                        16384\nstop                           "<|im_end|>"',
                     "model_info": {"qwen2.context_length": 32768}, "template": "{{ .Prompt }}"})
OLLAMA_SHOW_NO_NUM_CTX = (200, {"parameters": 'stop                           "<|im_end|>"',
                                "model_info": {"qwen2.context_length": 32768}})


def test_ollama_says_the_loaded_models_context_in_api_ps(fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server({("GET", "/v1/models"): OPENAI_MODELS, ("GET", "/api/ps"): OLLAMA_PS,
                          ("POST", "/api/show"): OLLAMA_SHOW})
    assert learn_endpoint(server.url, "x", MODEL) == EndpointFacts(8192, None, "ollama")
    assert server.paths() == ["GET /v1/models", "GET /props", "GET /api/ps"]


def test_ollama_model_not_loaded_gets_num_ctx_from_api_show(fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server({("GET", "/v1/models"): OPENAI_MODELS, ("GET", "/api/ps"): (200, {"models": []}),
                          ("POST", "/api/show"): OLLAMA_SHOW})
    facts = learn_endpoint(server.url, "x", MODEL)
    assert facts == EndpointFacts(16384, None, "ollama")  # not model_info's 32768, the trained maximum
    assert facts.describe() == "context 16384 tokens (ollama)"
    show = server.requests[-1]
    assert show["path"] == "/api/show" and json.loads(show["body"]) == {"model": MODEL}


def test_ollama_without_num_ctx_says_no_size(fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server({("GET", "/api/ps"): (200, {"models": []}), ("POST", "/api/show"): OLLAMA_SHOW_NO_NUM_CTX})
    facts = learn_endpoint(server.url, "x", MODEL)
    assert facts == EndpointFacts(None, None, "ollama")
    assert facts.describe() == "context not said (ollama)"


def test_a_server_that_is_not_ollama_gets_no_post(fake_server: Callable[..., FakeServer]) -> None:
    """The one POST goes only to a server whose /api/ps answered as Ollama's does: any other
    may take a POST for a chat completion (a proxy, a test double) or act on it."""
    server = fake_server({("POST", "/api/show"): OLLAMA_SHOW})
    assert learn_endpoint(server.url, "x", MODEL) == EndpointFacts()
    assert [p for p in server.paths() if p.startswith("POST")] == []


def test_llama_cpp_props_with_a_top_level_n_ctx(fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server({("GET", "/props"): (200, {"n_ctx": 2048, "total_slots": 1, "default_generation_settings": {}})})
    facts = learn_endpoint(server.url, "x", "m")
    assert facts == EndpointFacts(2048, 1, "props")
    assert facts.describe() == "context 2048 tokens (props), 1 slot"
    assert "GET /api/ps" not in server.paths(), "a size found: Ollama is not asked"


def test_sends_the_key_or_the_urls_userinfo(fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server({})
    learn_endpoint(server.url, "sk-test", "m")
    assert {r["headers"]["Authorization"] for r in server.requests} == {"Bearer sk-test"}
    server.requests.clear()
    learn_endpoint(server.url.replace("http://", "http://ops:s%40cret@"), "sk-test", "m")
    assert {r["headers"]["Authorization"] for r in server.requests} == {"Basic b3BzOnNAY3JldA=="}  # ops:s@cret


def test_redirects_and_unreadable_answers_teach_nothing(fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server({
        ("GET", "/v1/models"): (302, {}),
        ("GET", "/elsewhere"): (200, {"data": [{"id": "m", "max_model_len": 999}]}),
        ("GET", "/props"): (200, b"<html>not json</html>"),
        ("GET", "/api/ps"): (200, {"models": "not a list"}),
        ("POST", "/api/show"): (200, [1, 2]),
    })
    assert learn_endpoint(server.url, "x", "m") == EndpointFacts()
    assert "GET /elsewhere" not in server.paths()


def test_max_model_len_of_the_only_entry_or_the_named_one(fake_server: Callable[..., FakeServer]) -> None:
    only = fake_server({("GET", "/v1/models"): (200, {"data": [{"id": "Qwen/Qwen2.5-7B", "max_model_len": 32768}]})})
    assert learn_endpoint(only.url, "x", "served-name") == EndpointFacts(32768, None, "max_model_len")
    two = fake_server({("GET", "/v1/models"): (200, {"data": [{"id": "a", "max_model_len": 1024},
                                                              {"id": "b", "max_model_len": 4096}]})})
    assert learn_endpoint(two.url, "x", "b").context_tokens == 4096
    assert learn_endpoint(two.url, "x", "c").context_tokens is None
