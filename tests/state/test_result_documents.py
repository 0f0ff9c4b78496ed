"""Every line of `medq results` has every key CONTRACT.md "Results" lists, whether a run
stored the job's document yet or it is read off the job's state (queued, retrying)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_cli

# CONTRACT.md, "Results"
CONTRACT_KEYS = {"id", "job_id", "batch", "schema", "schema_version", "status", "data", "error", "model",
                 "endpoint", "attempts", "usage", "latency_ms", "metadata", "evidence", "provenance"}


def test_a_queued_jobs_line_has_every_contract_key(medq_env: dict[str, str], tmp_path: Path) -> None:
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"id": f"r{i}", "text": f"Note {i}: 60-year-old woman, asthma."}) + "\n"
                             for i in range(2)), encoding="utf-8")
    assert run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "docs"], medq_env).returncode == 0

    out = run_cli(["results", "docs", "--format", "jsonl"], medq_env)

    docs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [d["id"] for d in docs] == ["r0", "r1"]
    for doc in docs:
        assert doc["status"] == "queued" and doc["data"] is None
        assert CONTRACT_KEYS <= doc.keys(), CONTRACT_KEYS - doc.keys()
