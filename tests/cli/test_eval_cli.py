"""`medq eval`: per-field scores of a stored batch against a gold file, numbers checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from medq.core.contract import batch_key, job_key
from medq.state.results.redis_store import RedisResultStore
from tests.helpers import run_cli

VITALS_NONE = {"temperature_c": None, "heart_rate_bpm": None, "systolic_bp_mmhg": None,
               "diastolic_bp_mmhg": None, "spo2_pct": None}


def _note(age: object, diagnoses: list[str], meds: list[dict] | None = None, **kw: object) -> dict:
    return {"age": age, "sex": kw.get("sex"), "diagnoses": diagnoses, "medications": meds or [], "allergies": [],
            "vitals": kw.get("vitals", VITALS_NONE), "smoking_status": kw.get("smoking_status")}


def _store_batch(r: redis.Redis, redis_url: str, batch: str, preds: dict[str, dict | None]) -> None:
    store = RedisResultStore(redis_url)
    for seq, (rid, data) in enumerate(preds.items()):
        job_id = f"job-{rid}"
        status = "succeeded" if data is not None else "failed"
        r.hset(job_key(job_id), mapping={"batch": batch, "record_id": rid, "schema": "clinical_note",
                                          "schema_version": 1, "status": status, "attempts": 1, "seq": seq})
        r.sadd(batch_key(batch), job_id)
        store.put({"id": rid, "job_id": job_id, "batch": batch, "schema": "clinical_note", "schema_version": 1,
                   "status": status, "data": data,
                   "error": None if data is not None else {"kind": "output_invalid", "message": "m"}})


def test_eval_scores_a_batch_against_hand_checked_gold(r: redis.Redis, redis_url: str, medq_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    metformin = {"name": "metformin", "dose": "500 mg", "frequency": "twice daily"}
    gold = {
        "a": _note(70, ["hypertension", "type 2 diabetes"], [metformin], sex="male"),
        "b": _note(None, ["asthma"], sex="female", smoking_status="never"),
        "c": _note(35, ["migraine"]),
    }
    preds = {
        # age right, sex right, 1 of 2 diagnoses plus an invented one, metformin found with a wrong dose
        "a": _note(70, ["Hypertension", "gout"], [{**metformin, "dose": "1000 mg"}], sex="male"),
        # age right (null), sex wrong, diagnosis right ("acute asthma" contains "asthma"), smoking right
        "b": _note(None, ["acute asthma"], sex="male", smoking_status="never"),
        # failed job: wrong everywhere
        "c": None,
    }
    _store_batch(r, redis_url, "ev", preds)
    gold_file = tmp_path / "gold.jsonl"
    gold_file.write_text("".join(json.dumps({"id": k, "data": v}) + "\n" for k, v in gold.items()))

    res = run_cli(["eval", "ev", "--gold", str(gold_file), "--json"], medq_env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    rows = {row["field"]: row for row in report["rows"]}
    assert report["records"] == 3 and report["succeeded"] == 2 and report["failed"] == 1
    assert rows["age"]["accuracy"] == 2 / 3
    assert rows["sex"]["accuracy"] == 1 / 3
    # diagnoses: predicted a:2 + b:1 + c(failed, counts as 1 guess) = 4, gold 2+1+1 = 4, hits 2
    assert (rows["diagnoses"]["true_positives"], rows["diagnoses"]["predicted"], rows["diagnoses"]["gold"]) == (2, 4, 4)
    assert rows["diagnoses"]["precision"] == 0.5 and rows["diagnoses"]["recall"] == 0.5
    # medications: one gold (a), found; the dose of the matched pair is wrong, the frequency right
    assert rows["medications"]["recall"] == 1.0
    assert rows["medications.dose"]["accuracy"] == 0.0 and rows["medications.frequency"]["accuracy"] == 1.0
    assert rows["smoking_status"]["accuracy"] == 2 / 3  # a: null == null, b: never, c: failed
    assert 0 < report["macro"] < 1

    table = run_cli(["eval", "ev", "--gold", str(gold_file)], medq_env)
    assert "macro" in table.stdout and "diagnoses" in table.stdout


def test_eval_reports_a_bad_gold_line(r: redis.Redis, redis_url: str, medq_env: dict[str, str], tmp_path: Path) -> None:
    _store_batch(r, redis_url, "ev2", {"a": _note(1, [])})
    gold_file = tmp_path / "gold.jsonl"
    gold_file.write_text('{"id": "a", "data": {}}\nnot json\n')
    res = run_cli(["eval", "ev2", "--gold", str(gold_file)], medq_env)
    assert res.returncode == 2 and "line 2: not valid JSON" in res.stderr
