"""A model in a loop is told from a long honest answer, and a cut-off JSON
answer keeps what it already said."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.extract.runaway import complete_missing, dedupe_lists, is_runaway, salvage

MEDS = [
    ("metformin", "500 mg", "twice daily"), ("lisinopril", "10 mg", "once daily"),
    ("atorvastatin", "40 mg", "at night"), ("amlodipine", "5 mg", "once daily"),
    ("aspirin", "81 mg", "once daily"), ("furosemide", "40 mg", "every morning"),
    ("levothyroxine", "75 mcg", "before breakfast"), ("omeprazole", "20 mg", "once daily"),
    ("metoprolol succinate", "25 mg", "once daily"), ("insulin glargine", "18 units", "at bedtime"),
    ("sertraline", "50 mg", "once daily"), ("gabapentin", "300 mg", "three times daily"),
    ("tamsulosin", "0.4 mg", "at night"), ("warfarin", "5 mg", "as directed by INR"),
    ("salbutamol inhaler", "2 puffs", "as needed"), ("prednisolone", "30 mg", "for 5 days"),
    ("clopidogrel", "75 mg", "once daily"), ("spironolactone", "25 mg", "once daily"),
    ("allopurinol", "100 mg", "once daily"), ("paracetamol", "1 g", "four times daily as needed"),
    ("donepezil", "5 mg", "at night"), ("apixaban", "5 mg", "twice daily"),
    ("bisoprolol", "2.5 mg", "once daily"), ("ramipril", "2.5 mg", "once daily"),
    ("ferrous sulfate", "200 mg", "twice daily"), ("vitamin D3", "1000 IU", "once daily"),
    ("tiotropium", "18 mcg", "once daily"), ("mirtazapine", "15 mg", "at night"),
    ("senna", "7.5 mg", "two tablets at night"), ("lactulose", "15 mL", "twice daily"),
]


def names_only_table() -> str:
    """Drug names with nothing else known: honest, and compresses to ~0.15 with zlib."""
    fields = ("dose", "frequency", "route", "start_date")
    return json.dumps({"medications": [{"name": n, **dict.fromkeys(fields)} for n, _, _ in MEDS]})


def honest_medications(nulls: bool = False, indent: int | None = None) -> str:
    meds = [
        {"name": n, "dose": None if nulls and i % 2 else d, "frequency": None if nulls else f}
        for i, (n, d, f) in enumerate(MEDS)
    ]
    doc = {
        "age": 78,
        "sex": "female",
        "diagnoses": ["type 2 diabetes mellitus", "hypertension", "chronic kidney disease stage 3"],
        "medications": meds,
        "allergies": ["penicillin"],
        "smoking_status": "former",
    }
    return json.dumps(doc, ensure_ascii=False, indent=indent)


HONEST_ZH = json.dumps(
    {
        "age": 67,
        "diagnoses": ["高血压", "2型糖尿病", "冠状动脉粥样硬化性心脏病", "慢性肾脏病3期", "高脂血症", "脑梗死后遗症"],
        "medications": [
            {"name": "二甲双胍", "dose": "0.5 g", "frequency": "每日三次"},
            {"name": "氨氯地平", "dose": "5 mg", "frequency": "每日一次"},
            {"name": "阿托伐他汀", "dose": "20 mg", "frequency": "每晚一次"},
            {"name": "阿司匹林肠溶片", "dose": "100 mg", "frequency": "每日一次"},
            {"name": "胰岛素", "dose": "12 单位", "frequency": "睡前"},
        ],
        "summary": "患者因反复胸闷气短三年，加重伴双下肢水肿一周入院。给予利尿、扩血管、控制心室率等治疗后症状明显好转，"
        "双下肢水肿消退，血糖血压控制平稳，予以出院，嘱门诊随访。",
    },
    ensure_ascii=False,
)


# --- is_runaway ----------------------------------------------------------------


def test_a_list_of_one_item_repeated_is_a_loop() -> None:
    text = json.dumps({"age": 70, "diagnoses": ["hypertension"] * 50})
    assert is_runaway(text[:-2])


def test_a_loop_cut_in_the_middle_of_an_item_is_a_loop() -> None:
    text = '{"diagnoses": [' + ", ".join(['"hypertension"'] * 60) + ', "hyperte'
    assert is_runaway(text)


def test_a_string_repeating_a_phrase_is_a_loop() -> None:
    assert is_runaway('{"summary": "The patient ' + "and the patient " * 100)


def test_chinese_items_repeated_are_a_loop() -> None:
    assert is_runaway('{"diagnoses": [' + ", ".join(['"高血压"'] * 60))


def test_pretty_printed_repeated_objects_are_a_loop() -> None:
    item = {"name": "metformin", "dose": "500 mg", "frequency": "twice daily"}
    assert is_runaway(json.dumps({"medications": [item] * 40}, indent=2)[:-30])


def test_endless_whitespace_is_a_loop() -> None:
    assert is_runaway('{"age": 70, "diagnoses": ["asthma"]' + "\n" * 300)


def test_a_loop_that_varies_a_little_is_a_loop() -> None:
    rnd = random.Random(7)
    variants = ['"hypertension"', '"Hypertension"', '"hypertension "', '"essential hypertension"']
    assert is_runaway('{"diagnoses": [' + ", ".join(rnd.choice(variants) for _ in range(150)))


@pytest.mark.parametrize(
    "text",
    [honest_medications(), honest_medications(nulls=True), honest_medications(indent=2), names_only_table(), HONEST_ZH],
    ids=["medications", "medications-with-nulls", "pretty-printed", "names-and-nulls", "chinese"],
)
def test_an_honest_answer_cut_anywhere_is_not_a_loop(text: str) -> None:
    cut_at = [i for i in range(1, len(text) + 1) if is_runaway(text[:i])]
    assert cut_at == []


def test_a_short_answer_cut_off_is_not_a_loop() -> None:
    assert not is_runaway('{"age": 70, "diagnoses": ["hyperten')
    assert not is_runaway("")


def test_a_few_equal_values_in_an_honest_list_are_not_a_loop() -> None:
    doses = json.dumps({"doses": ["500 mg"] * 6 + ["1 g"]})
    assert not any(is_runaway(doses[:i]) for i in range(1, len(doses) + 1))


# --- salvage -------------------------------------------------------------------


def test_salvage_keeps_complete_values_and_drops_the_cut_item() -> None:
    assert salvage('{"age": 70, "diagnoses": ["a", "a", "a", "a') == {"age": 70, "diagnoses": ["a", "a", "a"]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"age": 70, "sex": ', {"age": 70}),
        ('{"age": 70, "sex"', {"age": 70}),
        ('{"age": 70, "diagnoses": [', {"age": 70}),
        ('{"age": 70, "diagnoses": ["asthma"], "vitals": {"spo2_pct": 98, "heart', {
            "age": 70, "diagnoses": ["asthma"], "vitals": {"spo2_pct": 98}}),
        ('{"age": 70, "weight": 8', {"age": 70}),  # 8 may have been 80
        ('{"age": 70, "smoker": true', {"age": 70, "smoker": True}),
        ('{"a": [[1, 2], [3, 4], [5', {"a": [[1, 2], [3, 4]]}),
        ('{"a": [[1, 2], [3, 4], [5, 6', {"a": [[1, 2], [3, 4], [5]]}),
    ],
)
def test_salvage_cuts_after_the_last_complete_value(text: str, expected: dict[str, Any]) -> None:
    assert salvage(text) == expected


def test_salvage_reads_escaped_quotes_and_brackets_inside_strings() -> None:
    text = '{"note": "said \\"stop\\" [sic] {x}, then", "diagnoses": ["a\\\\", "b\\"]'
    assert salvage(text) == {"note": 'said "stop" [sic] {x}, then', "diagnoses": ["a\\"]}


def test_salvage_keeps_chinese_text() -> None:
    text = '{"diagnoses": ["高血压", "2型糖尿病", "冠状动脉'
    assert salvage(text) == {"diagnoses": ["高血压", "2型糖尿病"]}


def test_salvage_strips_a_code_fence() -> None:
    assert salvage('```json\n{"age": 70, "diagnoses": ["a", "b') == {"age": 70, "diagnoses": ["a"]}
    assert salvage('```json\n{"age": 70}\n```') == {"age": 70}


@pytest.mark.parametrize(
    "text", ["", "{", '{"age": 7', '{"age":', "not json at all", '["a", "b"', '{"a": "unterminated']
)
def test_salvage_returns_none_when_nothing_is_left(text: str) -> None:
    assert salvage(text) is None


def test_salvage_of_a_runaway_answer_deduped() -> None:
    text = '{"age": 70, "diagnoses": [' + ", ".join(['"hypertension"'] * 60) + ', "hyperte'
    assert dedupe_lists(salvage(text)) == {"age": 70, "diagnoses": ["hypertension"]}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(
    doc=st.dictionaries(st.text(max_size=8), json_values, max_size=6),
    ascii=st.booleans(),
    indent=st.sampled_from([None, 2]),
)
def test_salvage_of_a_json_object_cut_anywhere_is_a_faithful_prefix(
    doc: dict[str, Any], ascii: bool, indent: int | None
) -> None:
    text = json.dumps(doc, ensure_ascii=ascii, indent=indent)
    for cut in range(len(text) + 1):
        got = salvage(text[:cut])
        if got is None:
            continue
        assert isinstance(got, dict)
        json.dumps(got)
        assert set(got) <= set(doc)
        for key, value in got.items():
            original = doc[key]
            if isinstance(original, list):
                assert len(value) <= len(original)
                assert original[: len(value) - 1] == value[:-1]  # the last item may itself be cut
            elif not isinstance(original, dict):
                assert value == original


@settings(max_examples=50, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=6))
def test_salvage_of_a_whole_object_is_the_object(doc: dict[str, Any]) -> None:
    assert salvage(json.dumps(doc)) == doc


# --- dedupe_lists ----------------------------------------------------------------


def test_dedupe_keeps_the_first_of_equal_items_after_normalising() -> None:
    value = {
        "diagnoses": ["Hypertension", "hypertension ", "  HYPERTENSION", "asthma"],
        "medications": [
            {"name": "Metformin", "dose": "500 mg"},
            {"dose": "500  mg", "name": "metformin"},
            {"name": "metformin", "dose": "1 g"},
        ],
        "nested": {"codes": [1, 1, "1", 2]},
    }
    assert dedupe_lists(value) == {
        "diagnoses": ["Hypertension", "asthma"],
        "medications": [{"name": "Metformin", "dose": "500 mg"}, {"name": "metformin", "dose": "1 g"}],
        "nested": {"codes": [1, "1", 2]},
    }


def test_dedupe_leaves_scalars_alone() -> None:
    assert dedupe_lists("a") == "a"
    assert dedupe_lists(None) is None


# --- complete_missing ------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "age": {"type": ["integer", "null"]},
        "sex": {"type": ["string", "null"], "enum": ["male", "female", None]},
        "smoking": {"enum": ["current", "never", None]},
        "diagnoses": {"type": "array", "items": {"type": "string"}},
        "allergies": {"type": ["array", "null"], "items": {"type": "string"}},
        "name": {"type": "string"},
        "vitals": {
            "type": "object",
            "properties": {"spo2_pct": {"type": ["integer", "null"]}, "hr": {"type": ["integer", "null"]}},
        },
        "ref": {"$ref": "#/$defs/Lab"},
        "optional_lab": {"anyOf": [{"$ref": "#/$defs/Lab"}, {"type": "null"}]},
    },
    "$defs": {
        "Lab": {"type": "object", "properties": {"value": {"type": ["number", "null"]}, "units": {"type": "array"}}}
    },
}


def test_complete_missing_fills_what_the_cut_lost() -> None:
    assert complete_missing({"age": 70, "vitals": {"spo2_pct": 98}}, SCHEMA) == {
        "age": 70,
        "sex": None,
        "smoking": None,
        "diagnoses": [],
        "allergies": None,
        "vitals": {"spo2_pct": 98, "hr": None},
        "ref": {"value": None, "units": []},
        "optional_lab": None,
    }


def test_complete_missing_never_overwrites() -> None:
    data = {"age": None, "sex": "male", "diagnoses": ["a"], "vitals": None, "name": "x", "ref": {"value": 1.5}}
    out = complete_missing(data, SCHEMA)
    assert {k: out[k] for k in data} == {**data, "ref": {"value": 1.5, "units": []}}
    assert data["ref"] == {"value": 1.5}  # the input is not changed


def test_complete_missing_with_the_project_schema() -> None:
    from medq.core.schemas import build_schema

    sch = build_schema(
        {
            "name": "note",
            "fields": {
                "age": {"type": ["integer", "null"]},
                "diagnoses": {"type": "array", "items": {"type": "string"}},
                "vitals": {"type": "object", "properties": {"spo2_pct": {"type": ["integer", "null"]}}},
            },
        }
    )
    salvaged = salvage('{"age": 70, "diagnoses": ["asthma", "asth')
    assert salvaged is not None
    completed = complete_missing(salvaged, sch.json_schema)
    assert sch.model.model_validate(completed).model_dump() == {
        "age": 70, "diagnoses": ["asthma"], "vitals": {"spo2_pct": None}}


def test_complete_missing_stops_on_a_schema_that_refers_to_itself() -> None:
    schema = {
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/Node"}},
        "$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}},
    }
    out = complete_missing({}, schema)
    depth = 0
    while isinstance(out, dict) and out:
        out, depth = next(iter(out.values())), depth + 1
    assert 1 < depth < 100
