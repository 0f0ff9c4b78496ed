"""PHI canaries: record text must reach only the payload store, the LLM and the result store.

Every record carries a unique marker. After a batch with successes, retries and a
dead letter, no marker may appear in the worker's log (at DEBUG), the CLI's output,
the Celery messages on the broker, the Celery result backend, or any other Redis key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from tests.conftest import run_cli

CANARY = "ZZCANARY"


def _values(r: redis.Redis, key: bytes) -> list[bytes]:
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


def _leaks(r: redis.Redis) -> dict[str, int]:
    """Keys outside the payload and result stores whose content holds a canary (body decoded too)."""
    hits: dict[str, int] = {}
    scanned = 0
    for key in r.scan_iter(count=1000):
        if key.startswith((b"medq:payload:", b"medq:result:")):
            continue
        scanned += 1
        for value in _values(r, key):
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
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
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
    proc = worker(base_url, "-c", "1", "--loglevel", "DEBUG", env={"MEDQ_LLM__REASKS": "1"})
    waited = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "phi", "--wait", "--timeout-s", "90"], medq_env)
    assert waited.returncode == 1  # the dead letter

    results = [json.loads(line) for line in run_cli(["results", "phi"], medq_env).stdout.splitlines()]
    assert sorted(d["status"] for d in results).count("failed") == 1
    assert any(CANARY in json.dumps(d["data"]) for d in results if d["data"])  # extraction did see the text

    # 3. everything else: worker log at DEBUG, CLI output, Celery backend and all other keys
    assert proc.log.count("succeeded in") >= 11  # the log is real, not empty
    assert CANARY not in proc.log
    for res in (enq, waited):
        assert CANARY not in res.stdout + res.stderr
    failed_out = run_cli(["failed", "phi"], medq_env)
    assert "output_invalid" in failed_out.stdout and CANARY not in failed_out.stdout
    assert r.keys("celery-task-meta-*"), "the Celery result backend was checked"
    assert _leaks(r) == {}
