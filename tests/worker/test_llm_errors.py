"""How servers' error answers, and sends without one, become medq's errors: back-pressure
is not failure. Each case goes over HTTP, through both clients (``LLMClient``, blocking;
``AsyncLLMClient``, the worker engine's): one table, whichever path asks."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from medq.core.errors import (
    EndpointTimeout,
    EndpointUnavailable,
    ModelNotFound,
    Overloaded,
    RateLimited,
    RequestRejected,
    ServerError,
)
from medq.state.metrics import metrics
from tests.helpers import Server, free_port
from tests.llm_paths import PATHS, complete
from worker.llm.client import FormatRejected

HI = [{"role": "user", "content": "hi"}]


class _Answering(Server):
    """A server of the test's own that answers every request with ``answer`` (status, headers, body)."""

    def __init__(self) -> None:
        self.answer: tuple[int, dict[str, str], bytes] = (200, {}, b"{}")
        super().__init__(lambda handler, body: self.answer)


@pytest.fixture(scope="module")
def server() -> Iterator[_Answering]:
    s = _Answering()
    yield s
    s.close()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("status", "message", "expected", "charged"),
    [
        (503, "server busy, please try again.  maximum pending requests exceeded", Overloaded, False),  # Ollama
        (500, "unexpected server status: llm busy - no slots available", Overloaded, False),  # Ollama
        (503, "Loading model", Overloaded, False),  # llama.cpp server while it loads
        (429, "Rate limit reached", RateLimited, False),
        (502, "Bad Gateway", EndpointUnavailable, False),  # a proxy in front of a dead server
        (504, "Gateway Timeout", EndpointTimeout, True),
        (500, "CUDA error: an illegal memory access was encountered", ServerError, True),
        (500, "1 validation error for ... response_format", FormatRejected, None),  # llama-cpp-python
        (400, "max_tokens is too large", RequestRejected, None),
        (404, 'model "qwen2.5" not found, try pulling it first', ModelNotFound, None),  # Ollama
        (404, "The model `Qwen/Qwen2.5-7B` does not exist.", ModelNotFound, None),  # vLLM
        (404, "404 page not found", RequestRejected, None),  # a base URL without /v1: not the model
    ],
)
def test_server_errors_are_classified(
    server: _Answering, path: str, status: int, message: str, expected: type, charged: bool | None
) -> None:
    server.answer = (status, {"retry-after": "3"}, json.dumps({"error": {"message": message}}).encode())
    with pytest.raises(expected) as caught:
        complete(path, server.base, HI)
    err = caught.value
    assert type(err) is expected
    assert err.message.startswith(f"HTTP {status} from {server.base}") and message not in err.message
    assert err.__cause__ is None  # the server's words are not chained into a logged traceback
    if charged is not None:
        assert err.charged is charged  # back-pressure waits; charged errors spend the retry budget
        assert err.retry_after_s == 3


@pytest.mark.parametrize("path", PATHS)
def test_an_answer_without_a_completion_is_a_server_error(server: _Answering, path: str) -> None:
    server.answer = (200, {}, b'{"choices": []}')
    with pytest.raises(ServerError, match=r"answered HTTP 200 without a chat completion in it$"):
        complete(path, server.base, HI)


@pytest.mark.parametrize("path", PATHS)
def test_no_answer_is_unavailable_or_a_timeout_and_counted(path: str) -> None:
    refused = f"http://127.0.0.1:{free_port()}/v1"
    metrics.take()
    with pytest.raises(EndpointUnavailable, match=rf"^cannot connect to {refused} \(\w+\)$") as caught:
        complete(path, refused, HI)
    assert caught.value.__cause__ is None
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        with pytest.raises(EndpointTimeout, match=rf"^no answer from {url} within the timeout$"):
            complete(path, url, HI, timeout_s=0.3)
    counted = metrics.take()
    assert counted[f"medq_llm_errors_total|endpoint={refused}|kind={EndpointUnavailable.kind}"] == 1
    assert counted[f"medq_llm_errors_total|endpoint={url}|kind={EndpointTimeout.kind}"] == 1
