"""Requests in flight follow the server: its slots where it says them (llama.cpp's
``/props``), its latency where it does not (a queue building at the server). Real
workers, the simulator serving ``--parallel 2``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from medq.state.endpoints import endpoint_snapshot
from tests.helpers import Proc, run_cli, wait_log

NOTE = "Mr Lee is a {age}-year-old man with hypertension. Amlodipine 5 mg once daily."


def _run(env: dict[str, str], tmp_path: Path, batch: str, n: int) -> None:
    records = tmp_path / f"{batch}.jsonl"
    records.write_text("".join(json.dumps({"id": f"r{i}", "text": NOTE.format(age=20 + i)}) + "\n" for i in range(n)),
                       encoding="utf-8")
    res = run_cli(["enqueue", str(records), "--schema", "clinical_note", "--batch", batch, "--wait",
                   "--timeout-s", "120"], env)
    assert res.returncode == 0, res.stderr


def _stats(base: str) -> dict:
    return httpx.get(base.removesuffix("/v1") + "/stats").json()


def test_a_server_that_says_its_slots_gets_no_more_requests_at_once(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    base = simulator("--parallel", "2", "--latency-ms", "100", "--advertise-context")
    proc = worker(base, env={"MEDQ_LLM__MAX_IN_FLIGHT": "8"})
    wait_log(proc, "works on 2 requests at once")
    _run(medq_env, tmp_path, "slots", 30)
    stats = _stats(base)
    assert stats["max_in_flight"] == 2 and stats["max_waiting"] == 0  # nothing queued at the server


def test_the_cap_follows_latency_when_the_server_does_not_say(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    base = simulator("--parallel", "2", "--latency-ms", "150")  # says nothing: an Ollama with 2 slots
    worker(base, env={"MEDQ_LLM__MAX_IN_FLIGHT": "8"})
    _run(medq_env, tmp_path, "pace1", 80)
    first = _stats(base)
    # the cap started at 1, not 8 (which queued six behind two slots), and grew while latency
    # stayed flat: past the slots by a step or two before the latency showed it
    assert first["max_in_flight"] >= 2 and first["max_waiting"] <= 4, first
    snap = endpoint_snapshot(r, base, 1)
    assert snap["cuts"] == 0 and snap["errors"] == 0, snap  # latency said it, never an error
    httpx.post(base.removesuffix("/v1") + "/sim/reset").raise_for_status()
    _run(medq_env, tmp_path, "pace2", 80)
    second = _stats(base)
    assert second["max_in_flight"] >= 2 and second["max_waiting"] <= 3, second  # the queue stays short
    assert second["outcomes"] == {"ok": 80}
