"""How servers' error answers become medq's errors: back-pressure is not failure."""

from __future__ import annotations

import httpx
import openai
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
from worker.llm.client import FormatRejected, LLMClient

def status_error(status: int, message: str, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    response = httpx.Response(status, headers=headers or {}, request=request)
    cls = {429: openai.RateLimitError, 400: openai.BadRequestError}.get(status, openai.InternalServerError)
    return cls(message, response=response, body={"error": {"message": message}})


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
def test_server_errors_are_classified(status: int, message: str, expected: type, charged: bool | None) -> None:
    client = LLMClient("http://127.0.0.1:1/v1", "x", "m")
    err = client._translate(status_error(status, message, {"retry-after": "3"}))
    assert type(err) is expected
    if charged is not None:
        assert err.charged is charged  # back-pressure waits; charged errors spend the retry budget
        assert err.retry_after_s == 3
