"""``medq bench``: throughput of the whole system against what the endpoint allows.

One run measures, side by side, on the same machine and the same endpoint:

- ``ceiling``: jobs/s of a direct asyncio client sending the requests a worker would
  send, ``parallel`` at a time, no queue (what the endpoint can give);
- ``medq``: jobs/s through producer -> Redis -> workers -> endpoint -> results,
  from the first enqueue to the last result;
- ``utilisation = medq / ceiling``;
- ``overhead``: jobs/s against a simulator with no latency (the queue's own limit),
  with the CPU milliseconds per job of the workers, Redis and the simulator;
- p50 / p95 end-to-end latency per job (enqueued -> result stored).

It starts what it needs (the simulator, the workers; Redis if none answers) and
stops it afterwards. ``--endpoint URL`` measures a real server instead of the
simulator (the overhead phase still uses the simulator). ``--compare-broker URL`` runs
the medq and overhead phases again with that broker (``amqp://...``: RabbitMQ), in the
same run, against the same endpoints: one table row per broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

import redis
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medq.core.contract import QUEUE, JobField, job_key
from medq.core.errors import BatchGone, DemoError
from medq.core.schemas import SchemaLoader
from medq.core.settings import Settings, get_settings
from medq.core.urls import redact_url
from medq.state.connect import connect
from medq.state.jobs import counts, job_ids, run_times_s
from medq.state.persistence import restart_note, server_life
from medq.state.results import open_store_for
from medq.tools.processes import Supervisor, _free_port, _wait_until, answers, ensure_redis
from medq.tools.samples import sample_path
from producer.enqueue import Producer
from worker.extract.processor import MedicalDataProcessor
from worker.llm.client import RESPONSE_FORMATS, response_format_for


@dataclass
class BenchOptions:
    jobs: int = 2000
    latency_ms: float = 200.0
    parallel: int = 64
    workers: int = 1  # worker processes on this node
    concurrency: int | None = None  # task messages per worker process; default: enough for 2 x parallel jobs
    pool: str = "threads"
    endpoint: str | None = None
    model: str | None = None
    overhead_jobs: int | None = None  # default: jobs
    skip_overhead: bool = False
    schema: str = "clinical_note"
    compare_broker: str | None = None  # a second broker measured in the same run


def _notes(n: int, batch: str) -> list[dict[str, Any]]:
    base = [json.loads(line) for line in sample_path("clinical_note").read_text().splitlines() if line.strip()]
    return [{"id": f"{batch}-{i:06d}", "text": base[i % len(base)]["text"]} for i in range(n)]


def _cpu_s(pgids: list[int]) -> float:
    """User + system CPU seconds of every live process in these process groups."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pgids:  # field 5 of stat: pgrp
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def _redis_cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _redis_commands(r: redis.Redis) -> int:
    return int(r.info("stats")["total_commands_processed"])


class Bench:
    def __init__(self, opts: BenchOptions, console: Console) -> None:
        self.opts = opts
        self.console = console
        self.settings = get_settings()
        self.sup = Supervisor(Path(tempfile.mkdtemp(prefix="medq-bench-")))
        self.r = connect(self.settings.redis_url)

    # ------------------------------------------------------------- helpers

    def start_simulator(self, latency_ms: float, parallel: int) -> tuple[str, int]:
        port = _free_port()
        proc = self.sup.start(
            f"simulator-{port}",
            [sys.executable, "-m", "medq.cli", "llm", "simulate", "--port", str(port),
             "--latency-ms", f"{latency_ms:g}", "--parallel", str(parallel)],
            dict(os.environ),
        )
        base = f"http://127.0.0.1:{port}/v1"
        _wait_until(lambda: answers(f"{base}/models"), "the simulator", self.sup, 30)
        return base, proc.popen.pid

    def start_workers(self, base_url: str, settings: Settings) -> list[int]:
        o = self.opts
        per = self.messages_per_process()
        env = {
            **os.environ,
            **({"MEDQ_BROKER_URL": settings.broker_url} if settings.broker_url else {}),
            "MEDQ_LLM__BASE_URL": base_url,
            "MEDQ_LLM__MAX_IN_FLIGHT": str(o.parallel),
            "MEDQ_LLM__MAX_WAIT_S": "30",
        }
        if o.model:
            env["MEDQ_LLM__MODEL"] = o.model
        procs = [
            self.sup.start(f"worker-{i}-{time.monotonic_ns()}",
                           [sys.executable, "-m", "medq.cli", "worker", "-c", str(per), "-P", o.pool, "--loglevel", "INFO",
                            "--", "--without-mingle", "--without-gossip"], env)
            for i in range(o.workers)
        ]
        for p in procs:
            _wait_until(lambda p=p: "ready." in p.log_path.read_text(errors="replace"), "a worker", self.sup, 60)
        time.sleep(1.0)
        return [p.popen.pid for p in procs]

    def messages_per_process(self) -> int:
        """Task messages per worker process (``-c``): enough for each process on its own to
        keep ``parallel`` requests in flight while messages turn over (2 x parallel jobs of
        MEDQ_JOBS_PER_MESSAGE each), as a ``medq worker`` sized for the endpoint is run on
        every host. (Splitting that among the processes measured 0.91-0.93 of the ceiling
        with 2 processes: a process's messages turn over while the other's are in flight.)"""
        o = self.opts
        jobs_per_message = max(self.settings.jobs_per_message, 1)
        return o.concurrency or max(-(-2 * o.parallel // jobs_per_message), 2)

    def stop_workers(self, pids: list[int]) -> None:
        keep = [s for s in self.sup.started if s.popen.pid not in pids]
        gone = [s for s in self.sup.started if s.popen.pid in pids]
        self.sup.started = gone
        self.sup.stop_all()
        self.sup.started = keep

    def request_body(self, base_url: str | None = None) -> dict[str, Any]:
        """What a worker sends for one record (strategy single), in the first
        response_format the endpoint accepts (asked as the processor's auto mode does)."""
        proc = MedicalDataProcessor.from_settings(self.settings, SchemaLoader(self.settings.schema_dirs))
        sch = proc.schema_loader.get(self.opts.schema)
        part = proc._parts_for(sch, proc.few_shot)[0]
        text = _notes(1, "x")[0]["text"]
        messages = [{"role": "system", "content": part.system}, *part.shots, {"role": "user", "content": text}]
        body: dict[str, Any] = {
            "model": self.opts.model or self.settings.llm.model,
            "messages": messages,
            "max_tokens": self.settings.llm.max_tokens,
            "temperature": self.settings.llm.temperature,
        }
        key = self.settings.llm.api_key.get_secret_value()
        for mode in RESPONSE_FORMATS:
            fmt = response_format_for(mode, sch.name, sch.json_schema)
            if fmt:
                body["response_format"] = fmt
            else:
                body.pop("response_format", None)
            if base_url is None:
                return body
            if _accepted(f"{base_url}/chat/completions", body, key):
                return body
        raise DemoError(f"{base_url} refused every response_format; is it an OpenAI-compatible chat endpoint?")

    # ------------------------------------------------------------- phases

    def ceiling(self, base_url: str, n: int) -> dict[str, float]:
        """``n`` requests over ``parallel`` kept-alive connections, from one asyncio loop.

        A bare HTTP/1.1 client on asyncio streams: httpx's async pool spends ~14 ms of
        CPU per request at 64 connections here (5.8 ms at 8), which would make the
        client, not the endpoint, the ceiling."""
        template = self.request_body(base_url)
        key = self.settings.llm.api_key.get_secret_value()
        url = urlsplit(base_url)
        host, port = url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)

        def request(text: str) -> bytes:
            # the same notes, in the same order, as the medq phase: a server with a
            # prompt cache must not get an easier ceiling from one repeated note
            body = {**template, "messages": [*template["messages"][:-1], {"role": "user", "content": text}]}
            payload = json.dumps(body).encode()
            head = (
                f"POST {url.path.rstrip('/')}/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n"
            ).encode()
            return head + payload

        requests = [request(x["text"]) for x in _notes(n, "ceiling")]
        ssl = url.scheme == "https"

        async def run() -> tuple[float, int]:
            left = n
            ok = 0

            async def conn() -> None:
                nonlocal left, ok
                reader, writer = await asyncio.open_connection(host, port, ssl=ssl or None)
                try:
                    while left > 0:
                        left -= 1
                        writer.write(requests[n - 1 - left])
                        status_line = await reader.readline()
                        length = 0
                        while (line := await reader.readline()) not in (b"\r\n", b""):
                            name, _, value = line.decode("latin-1").partition(":")
                            if name.strip().lower() == "content-length":
                                length = int(value)
                        body = await reader.readexactly(length)
                        if b" 200 " in status_line:
                            json.loads(body)
                            ok += 1
                finally:
                    writer.close()

            started = time.perf_counter()
            await asyncio.gather(*(conn() for _ in range(min(self.opts.parallel, n))))
            return time.perf_counter() - started, ok

        elapsed, ok = asyncio.run(run())
        return {"jobs": n, "ok": ok, "seconds": elapsed, "jobs_per_s": ok / elapsed}

    def through_medq(self, base_url: str, n: int, label: str, sim_pid: int | None,
                     settings: Settings | None = None) -> dict[str, Any]:
        settings = settings or self.settings
        pids = self.start_workers(base_url, settings)
        producer = Producer(settings)
        try:
            warm = f"bench-warm-{os.getpid()}-{time.monotonic_ns()}"
            warm_n = len(producer.enqueue(_notes(min(2 * self.opts.parallel, 100), warm), self.opts.schema, warm))
            self._wait(producer.r, warm, warm_n)
            batch = f"bench-{label}-{os.getpid()}-{time.monotonic_ns()}"
            records = _notes(n, batch)
            cpu0, sim0, redis0 = _cpu_s(list(pids)), _cpu_s([sim_pid]) if sim_pid else 0.0, _redis_cpu_s(self.r)
            cmds0 = _redis_commands(self.r)
            started = time.perf_counter()
            started_wall = time.time()
            producer.enqueue(records, self.opts.schema, batch)
            enqueued_s = time.perf_counter() - started
            self._wait(producer.r, batch, n, fast=not settings.broker_is_amqp)
            # to the last job's end as its state says, not to when the wait noticed it
            elapsed = min(time.perf_counter() - started, last_update_s(producer.r, job_ids(producer.r, batch)) - started_wall)
            cpu = _cpu_s(list(pids)) - cpu0
            sim_cpu = (_cpu_s([sim_pid]) - sim0) if sim_pid else 0.0
            redis_cpu = _redis_cpu_s(self.r) - redis0
            cmds = _redis_commands(self.r) - cmds0
            lat = self._latencies(producer.r, batch)
            calls = self._llm_calls(producer.r, batch)
            failed = sum(1 for x in lat if x is None)
            done = [x for x in lat if x is not None]
            q = statistics.quantiles(done, n=20) if len(done) >= 20 else [float("nan")] * 19
            return {
                "jobs": n,
                "failed": failed,
                "seconds": elapsed,
                "enqueue_seconds": enqueued_s,
                "jobs_per_s": n / elapsed,
                "p50_ms": statistics.median(done) * 1000 if done else float("nan"),
                "p95_ms": q[18] * 1000,
                "worker_cpu_ms_per_job": cpu * 1000 / n,
                "redis_cpu_ms_per_job": redis_cpu * 1000 / n,
                "simulator_cpu_ms_per_job": sim_cpu * 1000 / n,
                # everything Redis did meanwhile (progress polling included), per job
                "redis_commands_per_job": cmds / n,
                # re-asks and truncation retries make a job more than one request
                "llm_calls_per_job": calls,
            }
        finally:
            producer.close()
            self.stop_workers(pids)

    def _wait(self, r: redis.Redis, batch: str, n: int, fast: bool = True) -> None:
        """Until every one of the batch's ``n`` jobs is final. With Redis as the broker
        (``fast``), polls the queue and kombu's unacked hash (two commands) and reads the job
        states only once those are empty, so the waiting does not add to the Redis work being
        measured; with another broker, reads them every half second. Fewer than ``n`` job
        states: they vanished (a Redis restarted without persistence), and the run stops."""
        while True:
            pipe = r.pipeline(transaction=False)
            pipe.llen(QUEUE)
            pipe.hlen("unacked")
            if sum(pipe.execute()) == 0:
                c = counts(r, batch)
                if sum(c.values()) < n:
                    raise DemoError(BatchGone(batch, n, sum(c.values()), restart_note(server_life(r))).message)
                if c["succeeded"] + c["failed"] >= n:
                    return
            self.sup.check()
            time.sleep(0.05 if fast else 0.5)

    def _llm_calls(self, r: redis.Redis, batch: str) -> float:
        store = open_store_for(self.settings)
        try:
            docs = list(store.get_many(job_ids(r, batch)))
        finally:
            store.close()
        calls = [d["usage"]["calls"] for d in docs if d.get("usage")]
        return sum(calls) / len(calls) if calls else float("nan")

    @staticmethod
    def _latencies(r: redis.Redis, batch: str) -> list[float | None]:
        return run_times_s(r, job_ids(r, batch))

    def run(self) -> dict[str, Any]:
        o = self.opts
        try:
            ensure_redis(self.settings.redis_url, self.sup, self.console)
            sim_pid = None
            if o.endpoint:
                base = o.endpoint
                where = base
            else:
                base, sim_pid = self.start_simulator(o.latency_ms, o.parallel)
                where = f"simulator, latency {o.latency_ms:g} ms, parallel {o.parallel}"
            self.console.print(f"endpoint: {where}; {o.jobs} jobs; {o.workers} worker process(es), pool {o.pool}, "
                               f"{self.messages_per_process()} messages of {self.settings.jobs_per_message} jobs each",
                               highlight=False)
            ceiling = self.ceiling(base, o.jobs)
            self.console.print(f"ceiling (direct asyncio client): {ceiling['jobs_per_s']:.1f} jobs/s", highlight=False)
            medq = self.through_medq(base, o.jobs, "medq", sim_pid)
            self.console.print(f"medq: {medq['jobs_per_s']:.1f} jobs/s", highlight=False)
            out: dict[str, Any] = {
                "endpoint": where,
                "jobs": o.jobs,
                "parallel": o.parallel,
                "workers": o.workers,
                "pool": o.pool,
                "messages_per_process": self.messages_per_process(),
                "jobs_per_message": self.settings.jobs_per_message,
                "ceiling": ceiling,
                "medq": medq,
                "utilisation": medq["jobs_per_s"] / ceiling["jobs_per_s"] if ceiling["jobs_per_s"] else None,
            }
            base0, pid0 = (None, None) if o.skip_overhead else self.start_simulator(0, max(o.parallel, 64))
            if base0:
                out["overhead"] = self.through_medq(base0, o.overhead_jobs or o.jobs, "overhead", pid0)
                self.console.print(f"overhead (latency 0): {out['overhead']['jobs_per_s']:.1f} jobs/s", highlight=False)
            if o.compare_broker:
                out["broker"] = broker_name(self.settings)
                other = self.settings.model_copy(update={"broker_url": o.compare_broker})
                row: dict[str, Any] = {"broker": broker_name(other)}
                row["medq"] = self.through_medq(base, o.jobs, "medq-compare", sim_pid, other)
                row["utilisation"] = row["medq"]["jobs_per_s"] / ceiling["jobs_per_s"] if ceiling["jobs_per_s"] else None
                self.console.print(f"medq, {row['broker']} broker: {row['medq']['jobs_per_s']:.1f} jobs/s", highlight=False)
                if base0:
                    row["overhead"] = self.through_medq(base0, o.overhead_jobs or o.jobs, "overhead-compare", pid0, other)
                    self.console.print(f"overhead (latency 0), {row['broker']} broker: "
                                       f"{row['overhead']['jobs_per_s']:.1f} jobs/s", highlight=False)
                out["compare"] = row
            return out
        finally:
            self.sup.stop_all()


def report_table(res: dict[str, Any]) -> Table:
    t = Table(title=f"medq bench: {res['endpoint']}, {res['jobs']} jobs, parallel {res['parallel']}, "
                    f"{res['workers']} worker process(es) ({res['pool']})")
    for col in ("", "jobs/s", "p50 ms", "p95 ms", "LLM calls/job", "worker CPU ms/job", "Redis CPU ms/job",
                "simulator CPU ms/job", "Redis cmds/job"):
        t.add_column(col, justify="right")
    c, m = res["ceiling"], res["medq"]
    t.add_row("ceiling (direct client)", f"{c['jobs_per_s']:.2f}", "", "", "1", "", "", "", "")
    compare = res.get("compare")
    first = f", {res['broker']} broker" if compare else ""
    rows = [(f"medq{first}", m), (f"overhead (latency 0){first}", res.get("overhead"))]
    if compare:
        rows += [(f"medq, {compare['broker']} broker", compare["medq"]),
                 (f"overhead (latency 0), {compare['broker']} broker", compare.get("overhead"))]
    for name, row in rows:
        if row:
            t.add_row(escape(name), f"{row['jobs_per_s']:.2f}", f"{row['p50_ms']:.0f}", f"{row['p95_ms']:.0f}",
                      f"{row['llm_calls_per_job']:.2f}", f"{row['worker_cpu_ms_per_job']:.2f}", f"{row['redis_cpu_ms_per_job']:.2f}",
                      f"{row['simulator_cpu_ms_per_job']:.2f}", f"{row['redis_commands_per_job']:.1f}")
    t.add_row(f"utilisation = medq / ceiling{first}", f"{res['utilisation']:.3f}", "", "", "", "", "", "", "")
    if compare:
        t.add_row(f"utilisation, {compare['broker']} broker", f"{compare['utilisation']:.3f}", "", "", "", "", "", "", "")
        t.add_row(f"{compare['broker']} / {res['broker']} (medq jobs/s)",
                  f"{compare['medq']['jobs_per_s'] / m['jobs_per_s']:.3f}", "", "", "", "", "", "", "")
    return t


def broker_name(settings: Settings) -> str:
    """The broker as a table row names it."""
    return "RabbitMQ" if settings.broker_is_amqp else "Redis"


def last_update_s(r: redis.Redis, ids: list[str]) -> float:
    """Wall-clock seconds of the latest ``updated_at`` among the jobs (when the last one ended)."""
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(job_key(job_id), JobField.UPDATED_AT)
    stamps = [datetime.fromisoformat(x.decode()).timestamp() for x in pipe.execute() if x]
    return max(stamps) if stamps else time.time()


def _accepted(url: str, body: dict[str, Any], api_key: str) -> bool:
    """Whether the endpoint answers this chat completion with 200 (a refused
    response_format is a 4xx or 5xx)."""
    req = Request(url, data=json.dumps(body).encode(), method="POST",
                  headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    try:
        with urlopen(req, timeout=600) as resp:
            return bool(resp.status == 200)
    except HTTPError:
        return False
    except (URLError, OSError) as exc:
        raise DemoError(f"cannot reach {redact_url(url)}: {exc}") from None
