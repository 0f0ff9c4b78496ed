"""Redis behind Sentinel (issue 17, item 4): ``MEDQ_REDIS_URL=sentinel://...`` for the job
states, the broker and Celery's results, read once by ``medq.state.connect``.

The sentinel is ``redis-server --sentinel`` of the test's own, watching a private master
and its replica; a failover promotes the replica while clients keep writing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection

from medq.state.connect import celery_transport_options, celery_url, connect, parse_sentinel_url
from tests.helpers import MEDQ, Proc, free_port, run_cli, wait_log

MASTER = "medq-master"


@pytest.mark.parametrize(("url", "sentinels", "db", "password"), [
    (f"sentinel://127.0.0.1?master_name={MASTER}", [("127.0.0.1", 26379)], 0, None),
    (f"sentinel://:s%40cret@h1:26380/3;sentinel://h2:26381?master_name={MASTER}", [("h1", 26380), ("h2", 26381)], 3, "s@cret"),
    (f"sentinel://h1:26380;sentinel://h2:26381/2?master_name={MASTER}", [("h1", 26380), ("h2", 26381)], 2, None),
])
def test_a_sentinel_url_reads_the_same_for_medq_and_for_celery(
    url: str, sentinels: list[tuple[str, int]], db: int, password: str | None,
) -> None:
    s = parse_sentinel_url(url)
    assert (list(s.sentinels), s.master_name, s.db, s.password) == (sentinels, MASTER, db, password)
    # kombu refuses a query string in a broker URL and reads the first sentinel's part only
    conn = Connection(celery_url(url), transport_options=celery_transport_options(url))
    assert (conn.hostname, conn.port, int(conn.virtual_host), conn.password) == (*sentinels[0], db, password)
    assert conn.transport_options == {"master_name": MASTER}
    assert all(part.endswith(f"/{db}") for part in celery_url(url).split(";"))


@pytest.mark.parametrize(("url", "says"), [
    ("sentinel://h1:26379", "needs the master's name"),
    (f"sentinel://h1/0;sentinel://h2/1?master_name={MASTER}", "different databases"),
    (f"sentinel://h1?master=x&master_name={MASTER}", "unknown parameter 'master'"),
    (f"sentinel://:pw@h1;redis://h2?master_name={MASTER}", "each ';'-separated part"),
])
def test_a_wrong_sentinel_url_says_what_is_wrong_without_its_password(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as exc:
        parse_sentinel_url(url)
    assert "pw" not in str(exc.value)


def test_plain_urls_pass_through() -> None:
    for url in ("redis://:pw@127.0.0.1:6379/1", "rediss://h:6380/0", "unix:///run/redis.sock?db=2"):
        assert (celery_url(url), celery_transport_options(url)) == (url, {})


class SentinelSet:
    """A master, its replica and one sentinel (quorum 1), each a process of the test's own."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.master_port, self.replica_port, self.sentinel_port = free_port(), free_port(), free_port()
        self.url = f"sentinel://127.0.0.1:{self.sentinel_port}/0?master_name={MASTER}"
        self.procs: list[subprocess.Popen[bytes]] = []
        base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
        self._start("master", ["redis-server", "--port", str(self.master_port), *base])
        self._start("replica", ["redis-server", "--port", str(self.replica_port), *base,
                                "--replicaof", "127.0.0.1", str(self.master_port)])
        conf = tmp_path / "sentinel.conf"  # the sentinel rewrites its file: a copy of its own
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 5000\n"
        )
        self._start("sentinel", ["redis-server", str(conf), "--sentinel"])
        self.sentinel = redis.Redis(port=self.sentinel_port, decode_responses=True)
        self.wait_for(lambda: self.replicas_seen() >= 1, "the sentinel did not find the replica")

    def _start(self, name: str, args: list[str]) -> None:
        with open(self.dir / f"{name}.log", "ab") as log:
            self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def master_port_now(self) -> int:
        try:
            return int(self.sentinel.sentinel_get_master_addr_by_name(MASTER)[1])
        except (redis.ConnectionError, TypeError):
            return 0

    def replicas_seen(self) -> int:
        """Replicas the sentinel could promote: seen, and in sync with the master."""
        try:
            return sum(r.get("master-link-status") == "ok" for r in self.sentinel.sentinel_slaves(MASTER))
        except redis.RedisError:
            return 0

    @staticmethod
    def wait_for(ok: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    s = SentinelSet(tmp_path)
    yield s
    s.stop()


@pytest.mark.chaos  # the master is killed
def test_clients_follow_a_failover_when_the_master_dies(sentinel_set: SentinelSet) -> None:
    r = connect(sentinel_set.url)
    for i in range(100):
        r.set(f"medq:probe:{i}", i)
    assert r.wait(1, 5000) == 1  # the replica has them: what a failover keeps

    async def async_roundtrip() -> str | None:
        ar = connect(sentinel_set.url, asyncio=True, decode_responses=True)
        try:
            await ar.set("medq:probe-async", "yes")
            return await ar.get("medq:probe-async")
        finally:
            await ar.aclose()

    assert asyncio.run(async_roundtrip()) == "yes"

    sentinel_set.procs[0].kill()  # the master, kill -9
    started, refused = time.monotonic(), 0
    while True:
        try:
            r.set("medq:probe:after", "written")
            break
        except redis.ConnectionError:
            refused += 1
            assert time.monotonic() - started < 60, "no master after 60 s"
            time.sleep(0.1)
    print(f"master killed: writes refused for {time.monotonic() - started:.1f} s ({refused} tries), "
          "then went to the promoted replica")
    assert sentinel_set.master_port_now() == sentinel_set.replica_port
    promoted = redis.Redis(port=sentinel_set.replica_port)
    assert promoted.info("replication")["role"] == "master"
    assert promoted.get("medq:probe:after") == b"written"
    assert [promoted.get(f"medq:probe:{i}") for i in range(100)] == [str(i).encode() for i in range(100)]


def test_jobs_run_end_to_end_through_sentinel(
    sentinel_set: SentinelSet, medq_env: dict[str, str], simulator: Callable[..., str],
    start_process: Callable[..., Proc], tmp_path: Path,
) -> None:
    """The job states, the queue and Celery's results all through one sentinel URL."""
    base = simulator("--latency-ms", "20")
    env = {**medq_env, "MEDQ_REDIS_URL": sentinel_set.url, "MEDQ_LLM__BASE_URL": base}
    worker = start_process([MEDQ, "worker", "-c", "4"], env, name="worker")
    wait_log(worker, " ready.")
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"id": f"s{i}", "text": f"{50 + i}-year-old, asthma, on salbutamol."}) + "\n"
                             for i in range(8)))
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "via-sentinel", "--wait",
                   "--timeout-s", "90"], env, timeout_s=120)
    assert res.returncode == 0, res.stderr + worker.log[-3000:]
    status = json.loads(run_cli(["status", "via-sentinel", "--json"], env).stdout)
    assert (status["total"], status["succeeded"]) == (8, 8)
    docs = [json.loads(line) for line in run_cli(["results", "via-sentinel"], env).stdout.splitlines()]
    assert sorted(d["id"] for d in docs) == [f"s{i}" for i in range(8)]
    # it all lives in the master the sentinel names: states, and the queue Celery used
    master = redis.Redis(port=sentinel_set.master_port)
    assert master.scard("medq:batch:via-sentinel") == 8
    assert master.exists("_kombu.binding.medq")
