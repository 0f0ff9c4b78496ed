"""`medq flower`: a login unless the operator explicitly runs it open, metrics for
Prometheus. A real Flower process against the test Redis."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.helpers import MEDQ, Proc, free_port, run_cli, wait_http


def test_flower_will_not_start_without_credentials(medq_env: dict[str, str]) -> None:
    res = run_cli(["flower", "--port", str(free_port())], medq_env, timeout_s=60)
    assert res.returncode == 2
    assert "MEDQ_FLOWER__USER" in res.stderr and "MEDQ_FLOWER__PASSWORD" in res.stderr and "--insecure-no-auth" in res.stderr


def test_flower_asks_for_its_login_and_serves_metrics(medq_env: dict[str, str], start_process: Callable[..., Proc]) -> None:
    port = free_port()
    env = {**medq_env, "MEDQ_FLOWER__USER": "ops", "MEDQ_FLOWER__PASSWORD": "pw-7c2:x"}
    proc = start_process([MEDQ, "flower", "--port", str(port)], env, name="flower")
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/healthcheck", proc)
    assert f"Visit me at http://127.0.0.1:{port}" in proc.log  # loopback unless told otherwise
    assert "pw-7c2" not in proc.log
    for path in ("/", "/tasks", "/api/tasks", "/api/workers"):
        assert httpx.get(base + path, timeout=10).status_code == 401, path
        assert httpx.get(base + path, auth=("ops", "wrong"), timeout=10).status_code == 401, path
    assert httpx.get(base + "/", auth=("ops", "pw-7c2:x"), timeout=10).status_code == 200
    assert httpx.get(base + "/api/tasks", auth=("ops", "pw-7c2:x"), timeout=10).status_code == 200
    metrics = httpx.get(base + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "flower_" in metrics.text  # Prometheus scrapes it


def test_flower_runs_open_only_when_asked(medq_env: dict[str, str], start_process: Callable[..., Proc]) -> None:
    port = free_port()
    proc = start_process([MEDQ, "flower", "--port", str(port), "--insecure-no-auth"], medq_env, name="flower")
    wait_http(f"http://127.0.0.1:{port}/healthcheck", proc)
    assert httpx.get(f"http://127.0.0.1:{port}/api/workers", timeout=10).status_code == 200
    assert "without a login" in proc.log
