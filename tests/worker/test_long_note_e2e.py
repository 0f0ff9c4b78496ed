"""A 40,000-character discharge summary through a real worker, on a simulator that refuses
prompts longer than its context (as llama.cpp's server does) and says its context and
slots in ``/props``: the worker learns them at start, sends pieces that fit, merges."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from tests.helpers import LONG_CANARY, Proc, assert_evidence_slices_note_to_values, discharge_summary, run_cli, wait_log


def test_a_40k_character_note_is_read_in_pieces_that_fit_and_merged(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    base = simulator("--context-tokens", "4096", "--context-overflow", "refuse", "--advertise-context", "--parallel", "2")
    proc = worker(base)
    wait_log(proc, "context 4096 tokens")  # learned at start, from the server itself
    note = discharge_summary()
    assert len(note) >= 39_000
    records = tmp_path / "long.jsonl"
    records.write_text(json.dumps({"id": "long", "text": note}) + "\n", encoding="utf-8")
    res = run_cli(["enqueue", str(records), "--schema", "clinical_note", "--batch", "long", "--wait",
                   "--timeout-s", "180"], medq_env)
    assert res.returncode == 0, res.stderr

    [doc] = [json.loads(line) for line in run_cli(["results", "long"], medq_env).stdout.splitlines()]
    assert doc["status"] == "succeeded" and doc["attempts"] == 1
    prov = doc["provenance"]
    assert prov["pieces"] >= 5 and prov["context_tokens"] == 4096
    stats = httpx.get(base.removesuffix("/v1") + "/stats").json()
    assert "400" not in stats["outcomes"]  # no piece was refused: each fitted the context
    assert stats["max_in_flight"] <= 2  # no more at once than the server's slots
    assert doc["data"]["age"] == 72
    assert_evidence_slices_note_to_values(note, doc["data"], doc["evidence"])
    # the pieces' lists are merged, and their evidence points into the whole note, late pieces too
    assert len(doc["data"]["diagnoses"]) >= 2
    assert max(a for spans in doc["evidence"].values() for a, _ in spans) > len(note) // 2
    assert LONG_CANARY not in proc.log and LONG_CANARY not in res.stderr
