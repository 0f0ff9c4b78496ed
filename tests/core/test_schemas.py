"""SchemaLoader: the shipped schemas load, bad files are named with their file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from medq.core.errors import SchemaError, UnknownSchema
from medq.core.schemas import SchemaLoader
from medq.core.settings import REPO_ROOT

SHIPPED = REPO_ROOT / "configs" / "schemas"


def _write(d: Path, name: str, body: str) -> Path:
    p = d / f"{name}.yaml"
    p.write_text(body, encoding="utf-8")
    return p


def test_shipped_schemas_load_with_versions_and_json_schema() -> None:
    loader = SchemaLoader([SHIPPED])
    assert {"clinical_note", "discharge_summary"} <= set(loader.names())
    note = loader.get("clinical_note")
    assert note.version == 1
    js = note.json_schema
    assert js["type"] == "object" and js["additionalProperties"] is False
    assert set(js["required"]) == set(note.field_names)
    # nested objects are closed and fully required, which constrained decoders need
    med = js["properties"]["medications"]["items"]
    assert med["additionalProperties"] is False and set(med["required"]) == {"name", "dose", "frequency"}


def test_model_validates_and_rejects() -> None:
    note = SchemaLoader([SHIPPED]).get("clinical_note")
    good = {
        "age": 72, "sex": "male", "diagnoses": ["hypertension"],
        "medications": [{"name": "metformin", "dose": "500 mg", "frequency": "twice daily"}],
        "allergies": [], "smoking_status": None,
        "vitals": {"temperature_c": 37.2, "heart_rate_bpm": 80, "systolic_bp_mmhg": None,
                   "diastolic_bp_mmhg": None, "spo2_pct": 97},
    }
    assert note.model.model_validate(good).age == 72
    with pytest.raises(ValidationError):
        note.model.model_validate({**good, "sex": "unknown"})  # not in the enum
    with pytest.raises(ValidationError):
        note.model.model_validate({k: v for k, v in good.items() if k != "age"})  # every field required
    with pytest.raises(ValidationError):
        note.model.model_validate({**good, "medications": [{"name": "x"}]})  # nested required


def test_unknown_schema_lists_known_ones() -> None:
    with pytest.raises(UnknownSchema) as exc:
        SchemaLoader([SHIPPED]).get("radiology")
    assert "radiology" in str(exc.value) and "clinical_note" in str(exc.value)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("name: x\nversion: 1\nfields:\n  age: {type: int}\n", "'age'"),
        ("name: x\nversion: 1\nfields:\n  meds: {type: array}\n", "'meds'"),
        ("name: x\nversion: 0\nfields:\n  a: {type: string}\n", "version"),
        ("name: Bad Name\nfields:\n  a: {type: string}\n", "name"),
        ("name: x\nfields: {}\n", "fields"),
        ("name: x\nfields:\n  o: {type: object, properties: {a: {type: string}}, required: [b]}\n", "'o'"),
        ("name: [unclosed\n", "cannot read"),
    ],
)
def test_invalid_schema_file_names_file_and_field(tmp_path: Path, body: str, named: str) -> None:
    path = _write(tmp_path, "broken", body)
    loader = SchemaLoader([tmp_path])  # the bad file disables its own schema only
    [problem] = loader.problems
    with pytest.raises(SchemaError) as exc:
        loader.get(problem.name)
    for message in (problem.message, str(exc.value)):
        assert str(path) in message
        assert named in message or (named == "cannot read" and "not valid YAML" in message)


def test_extra_dirs_add_and_override(tmp_path: Path) -> None:
    _write(tmp_path, "lab", "name: lab_report\nversion: 2\nfields:\n  hba1c_pct: {type: [number, 'null']}\n")
    _write(tmp_path, "note", "name: clinical_note\nversion: 9\nfields:\n  age: {type: integer}\n")
    loader = SchemaLoader([SHIPPED, tmp_path])
    assert loader.get("lab_report").version == 2
    assert loader.get("clinical_note").version == 9


def test_enum_with_null_accepts_null_only_as_listed(tmp_path: Path) -> None:
    _write(tmp_path, "s", "name: s\nfields:\n  smoking: {type: [string, 'null'], enum: [current, never, null]}\n")
    sch = SchemaLoader([tmp_path]).get("s")
    assert sch.model.model_validate({"smoking": None}).smoking is None
    with pytest.raises(ValidationError):
        sch.model.model_validate({"smoking": "sometimes"})
