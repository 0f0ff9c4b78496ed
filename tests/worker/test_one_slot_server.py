"""A user's own one-slot model server with medq's **default** settings (issue 24).

The scene as a new user meets it: llama-cpp-python's server (one request at a time, says
nothing of its slots, refuses ``json_schema``), a worker started as the README shows it,
no ``MEDQ_LLM__MAX_IN_FLIGHT``, a schema of the user's own without examples. Before,
eight requests went out at once, all timed out together, the endpoint cooled, and 24
jobs took 184 deliveries. Here the simulator plays the server (``--parallel 1``, a call
of 1.5 s against the fixture's 10 s MEDQ_LLM__TIMEOUT_S: a CPU server's 25 s against
120 s, scaled); ``tests/local`` runs the embedded model itself (slow tier)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from medq.state.endpoints import endpoint_snapshot
from tests.helpers import Proc, run_cli

# The user's own schema: no examples, no instructions tuned for medq.
USER_SCHEMA = """\
name: referral
version: 1
description: Why a patient was referred, and to whom.
fields:
  specialty: {type: [string, "null"], description: The service the patient is referred to.}
  reason: {type: [string, "null"], description: Why the patient is referred.}
  urgent: {type: [boolean, "null"], description: Whether the referral is marked urgent.}
"""

NOTE = ("Referral {i}: {age}-year-old woman with new atrial fibrillation, referred to cardiology "
        "for rate control and anticoagulation. Not urgent. Seen by Dr Osei.")


def test_a_one_slot_server_with_default_settings_runs_every_job_once_without_timeouts(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker_process: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    base = simulator("--parallel", "1", "--latency-ms", "1500", "--reject-json-schema")
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    (schemas / "referral.yaml").write_text(USER_SCHEMA, encoding="utf-8")
    env = {**medq_env, "MEDQ_SCHEMAS_DIRS": str(schemas)}
    proc = worker_process(base, "-c", "2", env={"MEDQ_SCHEMAS_DIRS": str(schemas)})  # the README's command
    n = 24
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"id": f"n{i:02d}", "text": NOTE.format(i=i, age=40 + i)}) + "\n"
                             for i in range(n)), encoding="utf-8")
    res = run_cli(["enqueue", str(notes), "--schema", "referral", "--batch", "slot", "--wait", "--timeout-s", "240"], env)
    assert res.returncode == 0, res.stderr

    docs = [json.loads(x) for x in run_cli(["results", "slot"], medq_env).stdout.splitlines()]
    assert len(docs) == n and {d["status"] for d in docs} == {"succeeded"}
    assert [d["attempts"] for d in docs] == [1] * n  # every job on its first attempt
    assert sum(d["deliveries"] for d in docs) <= 1.25 * n  # none bounced through the broker
    stats = httpx.get(base.removesuffix("/v1") + "/stats").json()
    assert stats["streams_closed"] == 0  # no call given up (a timeout closes its stream)
    assert stats["max_waiting"] <= 2  # no wave of requests queued behind the one slot
    assert stats["response_formats"].get("json_schema") == 1  # refused once, for every job
    snap = endpoint_snapshot(r, base, 1)
    assert snap["errors"] == 0 and snap["trips"] == 0 and snap["cuts"] == 0, snap  # no timeout, no cooling
    assert "sent again" not in proc.log  # the orphan sweep found nothing lost
