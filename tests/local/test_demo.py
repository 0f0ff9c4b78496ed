"""`medq demo`: one command that starts what is missing, runs the samples, scores them and
stops exactly what it started, also on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.helpers import MEDQ, REPO, free_port, require_local_extra, run_cli


def _processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line or environment contains ``marker`` (ours excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            found.append(int(entry.name))
    return found


def _private_redis_env(medq_env: dict[str, str]) -> tuple[dict[str, str], int]:
    port = free_port()
    return {**medq_env, "MEDQ_REDIS_URL": f"redis://127.0.0.1:{port}/0"}, port


def test_demo_starts_redis_and_a_worker_and_stops_them(medq_env: dict[str, str], simulator: Callable[..., str]) -> None:
    env, port = _private_redis_env(medq_env)
    base_url = simulator()
    for _ in range(2):  # a second run is as clean as the first
        res = run_cli(["demo", "--endpoint", base_url, "--limit", "4", "--json"], env, timeout_s=180)
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["records"] == 4 and summary["succeeded"] == 4
        assert summary["report"]["records"] == 4 and summary["macro"] is not None
        assert f"starting redis-server on 127.0.0.1:{port}" in res.stderr
        assert _processes_mentioning(f"127.0.0.1:{port}") == []
        try:
            redis.Redis(port=port, socket_connect_timeout=1).ping()
            raise AssertionError("the demo left its redis-server running")
        except redis.ConnectionError:
            pass


def test_demo_uses_a_running_redis_and_leaves_it(r: redis.Redis, medq_env: dict[str, str],
                                                 simulator: Callable[..., str]) -> None:
    res = run_cli(["demo", "--endpoint", simulator(), "--limit", "2", "--schema", "discharge_summary"], medq_env,
                  timeout_s=180)
    assert res.returncode == 0, res.stderr
    assert "starting redis-server" not in res.stdout + res.stderr
    assert "macro" in res.stdout and "discharge_disposition" in res.stdout
    assert r.ping()


def test_ctrl_c_leaves_no_process_behind(medq_env: dict[str, str], simulator: Callable[..., str], tmp_path: Path) -> None:
    env, port = _private_redis_env(medq_env)
    base_url = simulator("--latency-ms", "3000", "--parallel", "1")
    log = tmp_path / "demo.log"
    with open(log, "wb") as fh:
        demo = subprocess.Popen([MEDQ, "demo", "--endpoint", base_url], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while b"batch demo-" not in log.read_bytes():
            assert time.monotonic() < deadline, log.read_text()
            assert demo.poll() is None, log.read_text()
            time.sleep(0.2)
        assert len(_processes_mentioning(f"127.0.0.1:{port}")) >= 2  # its redis-server and its worker
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 130
    finally:
        if demo.poll() is None:
            demo.kill()
    assert "everything the demo started has been stopped" in log.read_text()
    assert _processes_mentioning(f"127.0.0.1:{port}") == []


@pytest.mark.alone  # the 1.5B model on 2 cores: over 10 minutes for a record beside other tests, 1.5 alone
def test_demo_on_the_embedded_model(r: redis.Redis, medq_env: dict[str, str]) -> None:
    # the demo starts the embedded model itself: the default, qwen2.5-coder-1.5b
    require_local_extra("llama_cpp")
    # The tests' 10 s LLM timeout is for the simulator; a CPU model takes ~30 s a record.
    env = {k: v for k, v in medq_env.items() if k != "MEDQ_LLM__TIMEOUT_S"}
    res = run_cli(["demo", "--limit", "1", "--json"], env, timeout_s=600)  # one record: the path, not the score
    assert res.returncode == 0, res.stderr
    assert "starting the embedded model qwen2.5-coder-1.5b" in res.stderr  # the default, by measured score
    summary = json.loads(res.stdout)
    assert summary["model"] == "qwen2.5-coder-1.5b" and summary["records"] == 1
    assert summary["succeeded"] + summary["failed"] == 1
    assert summary["report"]["records"] == 1 and 0 <= summary["macro"] <= 1
    assert summary["profile"] == {"strategy": "single", "grounding": "flag", "few_shot": "true"}
