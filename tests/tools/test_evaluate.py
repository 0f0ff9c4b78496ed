"""medq.tools.evaluate: normalisation, matching and per-field scores, checked against
numbers worked out by hand; and the bundled samples score 1.0 against themselves."""

from __future__ import annotations

import json
from typing import Any

import pytest

from medq.core.schemas import ExtractionSchema, SchemaLoader, build_schema
from medq.core.settings import REPO_ROOT
from medq.tools import samples
from medq.tools.evaluate import (
    ScoreKind,
    evaluate,
    match_items,
    normalise,
    prf,
    records_by_id,
    values_equal,
)

SHIPPED = REPO_ROOT / "configs" / "schemas"

MINI = build_schema(
    {
        "name": "mini",
        "fields": {
            "age": {"type": ["integer", "null"]},
            "sex": {"type": ["string", "null"], "enum": ["male", "female", None]},
            "diagnoses": {"type": "array", "items": {"type": "string"}},
            "medications": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "dose": {"type": ["string", "null"]}},
                    "required": ["name", "dose"],
                },
            },
            "vitals": {
                "type": "object",
                "properties": {"temperature_c": {"type": ["number", "null"]}},
                "required": ["temperature_c"],
            },
        },
    }
)


def _rec(age: Any, sex: Any, dx: list[str], meds: list[tuple[str, str | None]], temp: Any) -> dict[str, Any]:
    return {
        "age": age,
        "sex": sex,
        "diagnoses": dx,
        "medications": [{"name": n, "dose": d} for n, d in meds],
        "vitals": {"temperature_c": temp},
    }


# Four gold records; r3's job failed and r4 has no prediction at all.
GOLD = {
    "r1": _rec(70, "male", ["Hypertension", "type 2 diabetes mellitus"],
               [("metformin", "500 mg"), ("ramipril", "5 mg")], 37.2),
    "r2": _rec(None, None, ["asthma", "moderate acute asthma exacerbation"],
               [("salbutamol", "2 puffs"), ("prednisolone", "40 mg")], None),
    "r3": _rec(50, "female", [], [("amlodipine", "5 mg")], 36.9),
    "r4": _rec(30, "male", ["gout"], [], None),
}
PRED: dict[str, dict[str, Any] | None] = {
    # age ok, sex ok after casefold; dx: exact + containment + 1 extra; meds: 1 of 2,
    # its dose "500mg" == "500 mg"; 37.24 is within 0.05 of 37.2
    "r1": _rec(70, "Male", ["hypertension", "type 2 diabetes", "gout"], [("Metformin", "500mg")], 37.24),
    # age invented (gold null): wrong; sex null == null; "acute asthma exacerbation"
    # pairs with the closer "moderate acute asthma exacerbation", not with "asthma";
    # both meds found, salbutamol's dose missed; temperature invented: wrong
    "r2": _rec(19, None, ["acute asthma exacerbation"], [("salbutamol", None), ("prednisolone", "40 mg")], 37.0),
    "r3": None,
    "zz": _rec(1, None, [], [], None),  # no gold label: ignored, counted
}
# By hand:
#   age          correct r1 only                       1/4
#   sex          r1, r2                                 2/4
#   diagnoses    tp 2+1+0+0=3  pred 3+1+1+1=6  gold 2+2+0+1=5   (r3 failed, gold empty -> 1 phantom;
#                                                               r4 missing, gold 1 -> 1 phantom)
#                P 3/6  R 3/5  F1 6/11
#   medications  tp 1+2+0+0=3  pred 1+2+1+1=5  gold 2+2+1+0=5   P 3/5  R 3/5  F1 3/5
#   medications.dose  matched pairs: r1 metformin ok, r2 salbutamol wrong, prednisolone ok   2/3
#   vitals.temperature_c  r1 only                       1/4
EXPECTED_MACRO = (1 / 4 + 2 / 4 + 6 / 11 + 3 / 5 + 2 / 3 + 1 / 4) / 6


def test_mini_report_matches_hand_computed_numbers() -> None:
    report = evaluate(MINI, PRED, GOLD)
    assert [r.field for r in report.rows] == [
        "age", "sex", "diagnoses", "medications", "medications.dose", "vitals.temperature_c",
    ]
    age, sex, dx, meds, dose, temp = report.rows
    assert (age.kind, age.n, age.correct, age.accuracy) == (ScoreKind.ACCURACY, 4, 1, 0.25)
    assert (sex.n, sex.correct, sex.accuracy) == (4, 2, 0.5)
    assert dx.kind is ScoreKind.PRF
    assert (dx.n, dx.true_positives, dx.predicted, dx.gold) == (4, 3, 6, 5)
    assert dx.precision == pytest.approx(3 / 6) and dx.recall == pytest.approx(3 / 5)
    assert dx.f1 == pytest.approx(6 / 11)
    assert (meds.true_positives, meds.predicted, meds.gold) == (3, 5, 5)
    assert (meds.precision, meds.recall, meds.f1) == pytest.approx((0.6, 0.6, 0.6))
    assert (dose.kind, dose.n, dose.correct) == (ScoreKind.ACCURACY, 3, 2)
    assert dose.accuracy == pytest.approx(2 / 3)
    assert (temp.n, temp.correct) == (4, 1)
    assert report.macro == pytest.approx(EXPECTED_MACRO)
    assert (report.records, report.succeeded, report.failed, report.missing, report.unmatched_predictions) == (
        4, 2, 1, 1, 1,
    )


def test_report_as_dict_is_json() -> None:
    d = json.loads(json.dumps(evaluate(MINI, PRED, GOLD).as_dict()))
    assert d["averaging"] == "micro" and d["macro"] == pytest.approx(EXPECTED_MACRO)
    rows = {r["field"]: r for r in d["rows"]}
    assert rows["diagnoses"]["kind"] == "prf" and rows["diagnoses"]["f1"] == pytest.approx(6 / 11)
    assert rows["medications.dose"] == {"field": "medications.dose", "kind": "accuracy", "n": 3,
                                        "accuracy": pytest.approx(2 / 3), "correct": 2}
    assert d["missing"] == 1 and d["failed"] == 1


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("  Type 2   Diabetes ", "type 2 diabetes"),
        ("METFORMIN", "metformin"),
        ("500mg", "500 mg"),
        ("５００ｍｇ", "500 mg"),  # full-width digits and letters
        ("0.5 g", "0.5g"),
        ("二甲双胍 0.5 g", "二甲双胍0.5g"),
        ("每日 两次", "每日两次"),
        ("“高血压”。", "高血压"),  # Chinese quotes and full stop around the value
        ("hypertension.", "hypertension"),
        ("- gout;", "gout"),
        ("36.8℃", "36.8 °C"),
        ("18µg", "18 μg"),  # micro sign vs Greek mu
        ("青霉素（皮疹）", "青霉素(皮疹)"),
    ],
)
def test_normalise_makes_equal(a: str, b: str) -> None:
    assert normalise(a) == normalise(b)


def test_normalise_keeps_what_matters() -> None:
    assert normalise("penicillin (rash)") == "penicillin (rash)"  # the ")" has its "(": kept
    assert normalise("5 mg") != normalise("50 mg")
    assert normalise(None) == ""
    assert normalise(True) == "true"


def test_values_equal_numbers_nulls_enums() -> None:
    num = {"type": ["number", "null"]}
    assert values_equal(37.24, 37.2, num) and values_equal(37.15, 37.2, num)
    assert not values_equal(37.3, 37.2, num)
    assert values_equal(72, 72.0, {"type": ["integer", "null"]})
    assert values_equal("72", 72, {"type": ["integer", "null"]})  # a stringly-typed answer still counts
    assert not values_equal(71, 72, {"type": ["integer", "null"]})
    assert values_equal(None, None, num)
    assert not values_equal(None, 37.2, num) and not values_equal(37.2, None, num)
    assert not values_equal("", None)  # an empty answer is not "not stated"
    assert values_equal("Female", "female", {"type": ["string", "null"], "enum": ["male", "female", None]})
    assert not values_equal(True, 1)


def test_match_items_exact_then_containment_one_to_one() -> None:
    assert match_items(["type 2 diabetes"], ["type 2 diabetes mellitus"]) == [(0, 0)]
    assert match_items(["Type 2 Diabetes Mellitus (T2DM)"], ["type 2 diabetes mellitus"]) == [(0, 0)]
    # exact pairs first: "asthma" is not used up by the longer gold item
    assert match_items(["moderate acute asthma exacerbation", "asthma"],
                       ["asthma", "moderate acute asthma exacerbation"]) == [(1, 0), (0, 1)]
    # among containments the closest in length wins, so the nested fields of the
    # right item get compared
    assert match_items(["acute asthma exacerbation"], ["asthma", "moderate acute asthma exacerbation"]) == [(0, 1)]
    assert match_items(["insulin"], ["insulin glargine", "insulin aspart"]) == [(0, 1)]
    # one-to-one: a duplicate prediction matches once
    assert match_items(["hypertension", "Hypertension"], ["hypertension"]) == [(0, 0)]
    # too short to count as contained
    assert match_items(["a"], ["asthma"]) == []
    assert match_items(["高血压"], ["原发性高血压"]) == [(0, 0)]
    assert match_items([], ["gout"]) == [] and match_items(["gout"], []) == []


def test_prf_edges() -> None:
    assert prf(0, 0, 0) == (1.0, 1.0, 1.0)
    assert prf(0, 0, 3) == (0.0, 0.0, 0.0)
    assert prf(0, 2, 0) == (0.0, 0.0, 0.0)
    assert prf(2, 3, 4) == pytest.approx((2 / 3, 1 / 2, 4 / 7))


def test_empty_lists_both_sides_score_one_but_a_failed_job_does_not() -> None:
    gold = {"a": _rec(None, None, [], [], None)}
    ok = evaluate(MINI, {"a": _rec(None, None, [], [], None)}, gold)
    assert ok.macro == 1.0
    assert (ok.row("diagnoses").precision, ok.row("diagnoses").recall, ok.row("diagnoses").f1) == (1.0, 1.0, 1.0)
    assert ok.row("medications.dose").n == 0 and ok.row("medications.dose").accuracy is None  # nothing matched
    failed = evaluate(MINI, {"a": None}, gold)
    assert failed.macro == 0.0
    assert failed.row("age").accuracy == 0.0  # null gold, but the job produced nothing: wrong
    assert failed.row("diagnoses").f1 == 0.0 and failed.row("diagnoses").predicted == 1


def test_failed_job_with_items_costs_precision_and_recall() -> None:
    gold = {"a": _rec(1, "male", ["x1", "y2"], [], None), "b": _rec(1, "male", ["x1", "y2"], [], None)}
    report = evaluate(MINI, {"a": _rec(1, "male", ["x1", "y2"], [], None), "b": None}, gold)
    dx = report.row("diagnoses")
    assert (dx.true_positives, dx.predicted, dx.gold) == (2, 4, 4)
    assert (dx.precision, dx.recall) == (0.5, 0.5)


def test_nested_dose_scored_on_matched_pairs_only() -> None:
    gold = {"a": _rec(None, None, [], [("metformin", "500 mg"), ("ramipril", "5 mg"), ("aspirin", "75 mg")], None)}
    pred = {"a": _rec(None, None, [], [("Metformin", "500mg"), ("ramipril", "10 mg"), ("bisoprolol", "5 mg")], None)}
    report = evaluate(MINI, pred, gold)
    assert (report.row("medications").true_positives, report.row("medications").f1) == (2, pytest.approx(2 / 3))
    # bisoprolol's "5 mg" is not compared with anything: it did not match a gold name
    assert (report.row("medications.dose").n, report.row("medications.dose").correct) == (2, 1)


def test_clinical_note_rows_split_objects_and_nested_fields() -> None:
    schema = SchemaLoader([SHIPPED]).get("clinical_note")
    fields = [r.field for r in evaluate(schema, {}, {}).rows]
    assert fields == [
        "age", "sex", "diagnoses", "medications", "medications.dose", "medications.frequency", "allergies",
        "vitals.temperature_c", "vitals.heart_rate_bpm", "vitals.systolic_bp_mmhg",
        "vitals.diastolic_bp_mmhg", "vitals.spo2_pct", "smoking_status",
    ]
    assert evaluate(schema, {}, {}).macro is None  # nothing scored


def test_records_by_id_reads_gold_and_results_lines() -> None:
    lines = ['{"id": "a", "data": {"age": 1}}', "", '{"id": "b", "status": "failed", "data": null}']
    assert records_by_id(lines) == {"a": {"age": 1}, "b": None}
    with pytest.raises(ValueError, match="line 2: duplicate record id 'a'"):
        records_by_id(['{"id": "a", "data": null}', '{"id": "a", "data": null}'])
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        records_by_id(["{nope"])
    with pytest.raises(ValueError, match="line 1: expected an object with a string 'id'"):
        records_by_id(['{"data": {}}'])


# --- the bundled samples -------------------------------------------------------

def _load(schema: str) -> tuple[ExtractionSchema, list[dict[str, Any]], dict[str, dict[str, Any]]]:
    es = SchemaLoader([SHIPPED]).get(schema)
    with samples.sample_path(schema).open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    with samples.gold_path(schema).open(encoding="utf-8") as f:
        gold = records_by_id(f)
    return es, records, {k: v for k, v in gold.items() if v is not None}


@pytest.mark.parametrize(("schema", "min_en", "min_zh"), [("clinical_note", 14, 10), ("discharge_summary", 5, 3)])
def test_bundled_samples_have_valid_gold_for_every_record(schema: str, min_en: int, min_zh: int) -> None:
    es, records, gold = _load(schema)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    assert set(gold) == set(ids)  # every gold id is a sample, and every sample has gold
    langs = [r["metadata"]["lang"] for r in records]
    assert langs.count("en") >= min_en and langs.count("zh") >= min_zh
    for r in records:
        assert 300 <= len(r["text"]) <= 900, r["id"]
    for record_id, data in gold.items():
        assert set(data) == set(es.field_names), record_id
        es.model.model_validate(data)


@pytest.mark.parametrize("schema", ["clinical_note", "discharge_summary"])
def test_bundled_gold_copies_the_wording_of_its_note(schema: str) -> None:
    es, records, gold = _load(schema)
    texts = {r["id"]: r["text"] for r in records}

    def strings(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        return []

    enums = {name for name, prop in es.fields.items() if "enum" in prop}
    for record_id, data in gold.items():
        for name, value in data.items():
            if name in enums:
                continue
            for s in strings(value):
                assert s in texts[record_id], f"{record_id}.{name}: {s!r} is not in the note"


@pytest.mark.parametrize("schema", ["clinical_note", "discharge_summary"])
def test_bundled_gold_scores_one_against_itself_and_zero_when_every_job_fails(schema: str) -> None:
    es, _, gold = _load(schema)
    perfect = evaluate(es, dict(gold), gold)
    assert perfect.macro == 1.0
    assert all(r.score == 1.0 for r in perfect.rows), [r.field for r in perfect.rows if r.score != 1.0]
    assert (perfect.records, perfect.succeeded, perfect.failed, perfect.missing) == (len(gold), len(gold), 0, 0)
    nothing = evaluate(es, {}, gold)
    assert nothing.macro == 0.0 and nothing.missing == len(gold)


def test_samples_module_paths() -> None:
    assert samples.sample_path("clinical_note") == samples.SAMPLES_DIR / "clinical_note.jsonl"
    assert samples.gold_path("discharge_summary").name == "discharge_summary.gold.jsonl"
    assert set(samples.available()) >= {"clinical_note", "discharge_summary"}
    with pytest.raises(FileNotFoundError, match="clinical_note"):
        samples.sample_path("radiology")
