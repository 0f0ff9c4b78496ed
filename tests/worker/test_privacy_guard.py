"""The privacy guard: a worker will not start against an endpoint outside the private
network unless the operator says so, and the refusal names the settings."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from medq.core.errors import RemoteEndpointRefused
from medq.core.privacy import check_endpoints, why_not_private
from tests.helpers import run_cli


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/v1",
        "http://localhost:11434/v1",
        "http://[::1]:8000/v1",
        "http://10.1.2.3:8000/v1",
        "http://172.16.0.9/v1",
        "http://192.168.1.20:11434/v1",
        "http://[fd12:3456::1]:8000/v1",
    ],
)
def test_loopback_and_private_endpoints_pass(url: str) -> None:
    assert why_not_private(url) is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://8.8.8.8:8000/v1", "8.8.8.8 is a public address"),
        ("http://[2001:4860::8888]/v1", "is a public address"),
        ("https://llm.invalid/v1", "llm.invalid does not resolve here"),
    ],
)
def test_public_or_unknown_endpoints_are_refused(url: str, says: str) -> None:
    assert says in (why_not_private(url) or "")
    with pytest.raises(RemoteEndpointRefused, match="MEDQ_LLM__ALLOWED_HOSTS.*MEDQ_ALLOW_REMOTE_LLM=true"):
        check_endpoints([url])


def test_allowed_hosts_and_the_opt_in_let_a_remote_endpoint_through() -> None:
    check_endpoints(["https://GPU1.example.org/v1"], allowed_hosts=["gpu1.example.org"])
    check_endpoints(["https://api.openai.com/v1"], allow_remote=True)
    with pytest.raises(RemoteEndpointRefused, match="8.8.8.8"):  # every endpoint is checked
        check_endpoints(["http://127.0.0.1:8080/v1", "http://8.8.8.8/v1"])


@pytest.mark.e2e  # the worker process refuses at start (worker_init)
def test_a_worker_refuses_to_start_against_a_public_endpoint(
    medq_env: dict[str, str], worker: Callable[..., object]
) -> None:
    env = {**medq_env, "MEDQ_LLM__ENDPOINTS": "http://127.0.0.1:9/v1,http://8.8.8.8:8000/v1"}
    res = run_cli(["worker", "-c", "1"], env, process=True)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "refusing to send patient text to http://8.8.8.8:8000/v1" in out
    assert "MEDQ_LLM__ALLOWED_HOSTS" in out and "MEDQ_ALLOW_REMOTE_LLM=true" in out
    # the operator's explicit opt-in: the same worker starts (nothing is sent until a job comes)
    worker("http://8.8.8.8:8000/v1", env={"MEDQ_ALLOW_REMOTE_LLM": "true"})
