"""`medq requeue`: which messages the dead letters go back in."""

from __future__ import annotations

import base64
import json

import redis

from medq.core.contract import QUEUE, failed_key, job_key
from medq.core.settings import Settings
from medq.state.jobs import requeue
from producer.enqueue import Producer


def _messages(r: redis.Redis) -> list[tuple[str, list[str]]]:
    out = []
    for raw in r.lrange(QUEUE, 0, -1):
        msg = json.loads(raw)
        [arg] = json.loads(base64.b64decode(msg["body"]))[0]
        out.append((msg["headers"]["task"], arg if isinstance(arg, list) else [arg]))
    return out


def test_requeue_sends_a_job_whose_worker_died_in_a_message_of_its_own(r: redis.Redis, redis_url: str) -> None:
    producer = Producer(Settings(redis_url=redis_url, jobs_per_message=16))
    ids = list(producer.enqueue([{"id": f"r{i:02d}", "text": f"note {i}"} for i in range(20)], schema="clinical_note", batch="b"))
    r.delete(QUEUE)
    # As workers record dead letters: two whose worker died while they ran (one a poison
    # record, one its companion that later timed out), the rest timed out.
    for n, job_id in enumerate(ids):
        kind, lost = ("worker_lost", 3) if n == 3 else ("timeout", 1 if n == 4 else 0)
        r.hset(job_key(job_id), mapping={"status": "failed", "error_kind": kind, "lost": lost})
        r.zadd(failed_key("b"), {job_id: n})
    report = requeue(producer, "b", all_failed=True)
    assert sorted(report.requeued) == sorted(ids)
    msgs = _messages(r)
    assert sorted(job for _, jobs in msgs for job in jobs) == sorted(ids)  # each sent once
    alone = [jobs for task, jobs in msgs if task == "medq.extract"]
    assert sorted(alone) == sorted([[ids[3]], [ids[4]]])
    assert all(ids[3] not in jobs and ids[4] not in jobs for task, jobs in msgs if task == "medq.extract_many")
    assert all(int(r.hget(job_key(j), "lost") or 0) == 0 for j in ids)  # a fresh budget, as before
