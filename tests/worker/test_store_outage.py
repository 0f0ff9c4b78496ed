"""A results store that goes away is back-pressure, not a dead worker.

PostgreSQL is reached through a TCP proxy of the test's own (the shared cluster on
127.0.0.1:5432 is never stopped): cutting the proxy closes its listener and every
connection through it, as a stopped server would; restoring it listens again.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import sqlalchemy as sa

from medq.state.jobs import iter_states
from tests.conftest import MEDQ, free_port, run_cli
from tests.worker.test_postgres_results import ADMIN_URL

PG_HOST, PG_PORT = "127.0.0.1", 5432
OUTAGE_DB = "medq_test_outage"  # a database of these tests' own: others truncate medq_test


class TcpProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL until cut; listens again when restored."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", self.port))
        lsock.listen(64)
        self._listener = lsock
        threading.Thread(target=self._accept, args=(lsock,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        with self._lock:
            socks, self._socks = self._socks, []
            lsock, self._listener = self._listener, None
        for s in [lsock, *socks]:
            if s is None:
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                client, _ = lsock.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not lsock:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def proxied_pg() -> Iterator[tuple[TcpProxy, str]]:
    """A PostgreSQL URL through a proxy the test can cut, on a database of its own."""
    try:
        engine = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            if not conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": OUTAGE_DB}).scalar():
                conn.execute(sa.text(f'CREATE DATABASE "{OUTAGE_DB}"'))
        engine.dispose()
    except sa.exc.OperationalError:
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    proxy = TcpProxy((PG_HOST, PG_PORT))
    user = ADMIN_URL.split("://", 1)[1].split("@", 1)[0]
    yield proxy, f"postgresql://{user}@127.0.0.1:{proxy.port}/{OUTAGE_DB}"
    proxy.cut()


def _records(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"r{i:03d}", "text": f"{30 + i}-year-old woman, cough."}) + "\n" for i in range(n)))
    return path


def _stats(base_url: str) -> dict:
    return httpx.get(base_url.removesuffix("/v1") + "/stats").json()


def _wait_until(check: Callable[[], bool], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


def test_a_store_outage_holds_the_answers_and_asks_the_model_once(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    proxied_pg: tuple[TcpProxy, str], tmp_path: Path,
) -> None:
    proxy, url = proxied_pg
    env = {**medq_env, "MEDQ_RESULTS_URL": url, "MEDQ_WORKER__LEASE_S": "3"}
    base = simulator("--latency-ms", "1500")
    w = worker(base, env={**env, "MEDQ_LLM__MAX_IN_FLIGHT": "8"})
    n = 40
    enqueue = subprocess.Popen(
        [MEDQ, "enqueue", str(_records(tmp_path / "recs.jsonl", n)), "--schema", "clinical_note", "--batch", "outage",
         "--wait", "--timeout-s", "240"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_until(lambda: Counter(st.status for st in iter_states(r, "outage"))["succeeded"] >= 4)
        proxy.cut()  # mid-batch: the rest of the answers arrive while the store is away
        time.sleep(15)
        proxy.restore()
        _, err = enqueue.communicate(timeout=240)
    finally:
        enqueue.kill()
    assert enqueue.returncode == 0, err

    states = list(iter_states(r, "outage"))
    assert len(states) == n and {st.status for st in states} == {"succeeded"}
    assert not [st for st in states if st.error_kind == "worker_lost"]
    assert _stats(base)["requests"] == n  # every answer kept: no job asked twice
    docs = [json.loads(x) for x in run_cli(["results", "outage"], env).stdout.splitlines()]
    assert len(docs) == n and all(d["data"] is not None and d["attempts"] == 1 for d in docs)
    log = w.log  # type: ignore[attr-defined]
    assert "result store unavailable" in log
    assert "INSERT" not in log and "parameters" not in log  # the driver's text (SQL, values) is never logged


def test_a_store_away_past_the_bound_fails_a_job_that_plain_requeue_takes(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    proxied_pg: tuple[TcpProxy, str], tmp_path: Path,
) -> None:
    proxy, url = proxied_pg
    env = {**medq_env, "MEDQ_RESULTS_URL": url}
    base = simulator()
    worker(base, env={**env, "MEDQ_WORKER__STORE_WAIT_S": "3"})
    proxy.cut()
    recs = _records(tmp_path / "recs.jsonl", 2)
    res = run_cli(["enqueue", str(recs), "--schema", "clinical_note", "--batch", "away", "--wait", "--timeout-s", "90"], env)
    assert res.returncode == 1, res.stderr
    dead = [json.loads(x) for x in run_cli(["failed", "away", "--json"], env).stdout.splitlines()]
    assert sorted(d["error_kind"] for d in dead) == ["store_unavailable"] * 2
    assert "MEDQ_WORKER__STORE_WAIT_S" in dead[0]["error_message"]

    proxy.restore()
    assert "requeued 2 job(s)" in run_cli(["requeue", "away"], env).stderr  # plain requeue: a transient kind
    res = run_cli(["enqueue", str(recs), "--schema", "clinical_note", "--batch", "away", "--wait", "--timeout-s", "90"], env)
    assert res.returncode == 0, res.stderr
    docs = [json.loads(x) for x in run_cli(["results", "away"], env).stdout.splitlines()]
    assert [d["status"] for d in docs] == ["succeeded"] * 2
