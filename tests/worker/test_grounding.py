"""Grounding: values the model did not find in the note are flagged, or dropped."""

from __future__ import annotations

from medq.core.schemas import SchemaLoader
from worker.extract.grounding import drop_ungrounded, ungrounded_paths

SCHEMA = SchemaLoader().get("clinical_note").json_schema
NOTE = "67-year-old man. PMH: hypertension. Metformin 500mg twice daily. T 36.8 °C, HR 98. 患者吸烟，高血压。"


def _data(**kw: object) -> dict:
    base = {
        "age": 67, "sex": "male", "diagnoses": [], "medications": [], "allergies": [], "smoking_status": None,
        "vitals": {"temperature_c": None, "heart_rate_bpm": None, "systolic_bp_mmhg": None,
                   "diastolic_bp_mmhg": None, "spo2_pct": None},
    }
    return {**base, **kw}


def test_values_in_the_note_are_grounded_across_case_spacing_and_scripts() -> None:
    data = _data(diagnoses=["Hypertension", "高血压"],
                 medications=[{"name": "metformin", "dose": "500 mg", "frequency": "twice daily"}],
                 vitals={**_data()["vitals"], "temperature_c": 36.8, "heart_rate_bpm": 98})
    assert ungrounded_paths(data, SCHEMA, NOTE) == []


def test_invented_values_are_flagged_by_path_and_enums_are_not_checked() -> None:
    data = _data(age=28, sex="female", diagnoses=["hypertension", "asthma"],
                 medications=[{"name": "metformin", "dose": "10mg", "frequency": None}],
                 smoking_status="never")
    assert ungrounded_paths(data, SCHEMA, NOTE) == ["age", "diagnoses[1]", "medications[0].dose"]


def test_drop_removes_invented_values_and_keeps_the_rest_valid() -> None:
    data = _data(age=28, diagnoses=["hypertension", "asthma"],
                 medications=[{"name": "metformin", "dose": "10mg", "frequency": "twice daily"},
                              {"name": "warfarin", "dose": None, "frequency": None}],
                 allergies=["penicillin"])
    cleaned = drop_ungrounded(data, SCHEMA, NOTE)
    assert cleaned["age"] is None  # nullable scalar -> null
    assert cleaned["diagnoses"] == ["hypertension"]  # invented list item goes
    assert cleaned["medications"] == [{"name": "metformin", "dose": None, "frequency": "twice daily"}]
    assert cleaned["allergies"] == []
    SchemaLoader().get("clinical_note").model.model_validate(cleaned)
