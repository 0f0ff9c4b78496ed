"""PHI canaries: record text must reach only the payload store, the LLM and the result store.

Every record carries a unique marker. After a batch with successes, retries and a
dead letter, no marker may appear in the worker's log (at DEBUG and INFO), the CLI's
output, the Celery messages on the broker, the Celery result backend, the task
events, Flower's pages and API, or any other Redis key.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from tests.helpers import CANARY, MEDQ, Proc, decoded, free_port, report_scan, run_cli, values, wait_http, wait_until


def _scanned_keys(r: redis.Redis) -> int:
    return sum(1 for k in r.scan_iter(count=1000) if not k.startswith((b"medq:payload:", b"medq:result:")))


def _leaks(r: redis.Redis) -> dict[str, int]:
    """Keys outside the payload and result stores whose content holds a canary (body decoded too)."""
    hits: dict[str, int] = {}
    scanned = 0
    for key in r.scan_iter(count=1000):
        if key.startswith((b"medq:payload:", b"medq:result:")):
            continue
        scanned += 1
        for value in values(r, key):
            blobs = [value]
            try:  # kombu messages carry the task body base64-encoded
                body = json.loads(value).get("body")
                if isinstance(body, str):
                    import base64

                    blobs.append(base64.b64decode(body))
            except (ValueError, AttributeError, UnicodeDecodeError):
                pass
            if any(CANARY.encode() in b or key.find(CANARY.encode()) >= 0 for b in blobs):
                hits[key.decode(errors="replace")] = hits.get(key.decode(errors="replace"), 0) + 1
    assert scanned > 0
    return hits


def test_record_text_stays_out_of_logs_messages_and_celery_results(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker_process: Callable[..., object], tmp_path: Path
) -> None:
    notes = tmp_path / "phi.jsonl"
    notes.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "text": f"{CANARY}{i:03d} Mr {CANARY}NAME{i} is a {50 + i}-year-old man with {CANARY}DX{i}."}) + "\n"
            for i in range(12)
        ),
        encoding="utf-8",
    )
    # one job per message, so that one job runs at a time and the scripted answers below
    # go to the jobs in order (messages with many jobs: tests/producer)
    medq_env = {**medq_env, "MEDQ_JOBS_PER_MESSAGE": "1"}
    enq = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "phi"], medq_env)
    assert enq.returncode == 0, enq.stderr

    # 1. the broker, while the messages wait in the queue
    assert r.llen("medq") == 12
    assert _leaks(r) == {}

    # 2. run them: one dead letter (invalid answers), a retry (429, 500), the rest fine
    base_url = simulator()
    httpx.post(base_url.removesuffix("/v1") + "/sim/script",
               json={"outcomes": ["invalid", "invalid", "429", "500"]}).raise_for_status()
    # one job at a time, so the scripted answers go to the jobs in order
    proc = worker_process(base_url, "-c", "1", "--loglevel", "DEBUG", env={"MEDQ_LLM__REASKS": "1"})
    waited = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "phi", "--wait", "--timeout-s", "90"], medq_env)
    assert waited.returncode == 1  # the dead letter

    results = [json.loads(line) for line in run_cli(["results", "phi"], medq_env).stdout.splitlines()]
    assert sorted(d["status"] for d in results).count("failed") == 1
    assert any(CANARY in json.dumps(d["data"]) for d in results if d["data"])  # extraction did see the text

    # 3. everything else: worker log at DEBUG, CLI output, Celery backend and all other keys
    # the log is real, not empty (a task's last line comes just after its job's end)
    wait_until(lambda: proc.log.count("succeeded in") >= 11, timeout_s=30)
    assert CANARY not in proc.log
    for res in (enq, waited):
        assert CANARY not in res.stdout + res.stderr
    failed_out = run_cli(["failed", "phi"], medq_env)
    assert "output_invalid" in failed_out.stdout and CANARY not in failed_out.stdout
    assert r.keys("celery-task-meta-*"), "the Celery result backend was checked"
    assert _leaks(r) == {}


def test_flower_events_and_the_info_log_show_no_record_text(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker_process: Callable[..., object],
    start_process: Callable[..., Proc], tmp_path: Path,
) -> None:
    """What an operator sees: Flower's pages and API, the task events it lives on, the
    worker log at INFO. A batch of many-job messages with a retry, then a dead letter."""
    # every message published on Redis while the batch runs: Celery's task events included
    events: list[bytes] = []
    sub = redis.Redis.from_url(medq_env["MEDQ_REDIS_URL"]).pubsub()
    sub.psubscribe("*")
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            msg = sub.get_message(timeout=0.2)
            if msg and msg["type"] == "pmessage":
                events.append(msg["channel"] + b" " + msg["data"])

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    port = free_port()
    flower_env = {**medq_env, "MEDQ_FLOWER__USER": "ops", "MEDQ_FLOWER__PASSWORD": "pw-canary"}
    flower = start_process([MEDQ, "flower", "--port", str(port)], flower_env, name="flower")
    flower_url = f"http://127.0.0.1:{port}"
    wait_http(f"{flower_url}/healthcheck", flower)

    base = simulator()
    proc = worker_process(base, "--loglevel", "INFO", env={"MEDQ_LLM__REASKS": "1"})
    notes = tmp_path / "phi.jsonl"
    notes.write_text("".join(
        json.dumps({"id": f"f{i}", "text": f"{CANARY}{i:03d} Mrs {CANARY}NAME{i}, {40 + i} years, {CANARY}DX{i}."}) + "\n"
        for i in range(20)
    ), encoding="utf-8")
    httpx.post(base.removesuffix("/v1") + "/sim/script", json={"outcomes": ["429"]}).raise_for_status()
    assert run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "fl", "--wait", "--timeout-s", "90"],
                   medq_env).returncode == 0
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"id": "dead", "text": f"{CANARY}DEAD Mr {CANARY}LAST, 80 years."}) + "\n", encoding="utf-8")
    httpx.post(base.removesuffix("/v1") + "/sim/script", json={"outcomes": ["invalid", "invalid"]}).raise_for_status()
    assert run_cli(["enqueue", str(one), "--schema", "clinical_note", "--batch", "fl-dead", "--wait", "--timeout-s", "60"],
                   medq_env).returncode == 1

    auth = ("ops", "pw-canary")
    deadline = time.monotonic() + 20  # Flower learns of the last task from its events
    while time.monotonic() < deadline:
        tasks = httpx.get(f"{flower_url}/api/tasks", auth=auth, timeout=10).json()
        states = {t.get("state") for t in tasks.values()}
        if len(tasks) >= 3 and "FAILURE" in states and "STARTED" not in states and "RECEIVED" not in states:
            break
        time.sleep(0.5)
    stop.set()
    listener.join(5)
    sub.close()

    names = {t["name"] for t in tasks.values()}
    assert {"medq.extract_many", "medq.extract"} <= names  # the batch's messages, its retry and the dead letter
    datatable = "/tasks/datatable?draw=1&start=0&length=100&order[0][column]=0&columns[0][data]=name&order[0][dir]=asc"
    pages = {path: httpx.get(flower_url + path, auth=auth, timeout=10) for path in
             ("/", "/tasks", "/workers", "/api/tasks", "/api/workers", datatable)}
    pages.update({f"/task/{tid}": httpx.get(f"{flower_url}/task/{tid}", auth=auth, timeout=10) for tid in tasks})
    assert [(k, p.status_code) for k, p in pages.items() if p.status_code != 200] == []
    assert any("OutputInvalid" in p.text for p in pages.values())  # the failure is there, by its class
    leaks = [path for path, p in pages.items() if CANARY in p.text]
    assert leaks == []
    bodies = [decoded(e) for e in events]
    assert any(b"task-failed" in d for d in bodies) and any(b"task-succeeded" in d for d in bodies)
    assert [d for d in bodies if CANARY.encode() in d] == []
    assert proc.log.count("succeeded in") >= 2 and CANARY not in proc.log and CANARY not in flower.log
    leaked = _leaks(r)
    assert leaked == {}
    report_scan("flower-events-logs", {
        "Flower pages and API answers (task pages included)": len(pages),
        "messages published on Redis (task events, worker heartbeats, pidbox)": len(events),
        "worker log lines at INFO": len(proc.log.splitlines()),
        "Flower log lines": len(flower.log.splitlines()),
        "Redis keys outside the payload and result stores": _scanned_keys(r),
    }, hits=len(leaks) + len(leaked))
