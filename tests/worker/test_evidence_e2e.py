"""End to end: `medq results` shows, for each value, the spans of the note it was read from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import redis

from tests.helpers import assert_evidence_slices_note_to_values, run_cli

NOTES = {
    "en": "Mr Lee is a 72-year-old male with hypertension. Metformin 500 mg twice daily. Never smoker.",
    "zh": "患者男，６８岁。高血压病史10年，服用氨氯地平5mg每日一次。吸烟。",
    "mixed": "CLINIC NOTE\r\n\tAge: 45.  Asthma, GOUT.\u3000Allopurinol 100\u00a0mg daily; former smoker.",
}


def test_results_carry_evidence_that_slices_the_note_to_each_value(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    tmp_path: Path,
) -> None:
    worker(simulator())  # the simulator copies phrases of the note into the values
    records = tmp_path / "notes.jsonl"
    records.write_text("".join(json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n" for k, v in NOTES.items()),
                       encoding="utf-8")
    res = run_cli(["enqueue", str(records), "--schema", "clinical_note", "--wait", "--timeout-s", "120"], medq_env)
    assert res.returncode == 0, res.stderr
    batch = res.stdout.strip()

    out = run_cli(["results", batch], medq_env)
    assert out.returncode == 0, out.stderr
    docs = {d["id"]: d for d in map(json.loads, out.stdout.splitlines())}
    assert set(docs) == set(NOTES)
    for rid, doc in docs.items():
        note = NOTES[rid]
        assert doc["status"] == "succeeded"
        assert doc["evidence"], rid
        assert_evidence_slices_note_to_values(note, doc["data"], doc["evidence"])
        assert doc["provenance"]["ungrounded_fields"] == []
    en = docs["en"]["evidence"]
    assert en["age"] == [[NOTES["en"].index("72"), NOTES["en"].index("72") + 2]]
    zh = docs["zh"]
    assert zh["data"]["age"] == 68 and [NOTES["zh"][a:b] for a, b in zh["evidence"]["age"]] == ["６８"]

    csv = run_cli(["results", batch, "--format", "csv"], medq_env)  # a table of values: no evidence column
    assert csv.returncode == 0 and "evidence" not in csv.stdout.splitlines()[0]
