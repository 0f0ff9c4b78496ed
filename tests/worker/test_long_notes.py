"""Splitting a long note into pieces that fit, and merging the pieces' answers."""

from __future__ import annotations

import re
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from medq.core.tokens import estimate_text_tokens
from worker.extract.long_notes import merge_answers, split_note

SECTION = (
    "{title}:\n"
    "Day {n}: the patient was reviewed on the ward round. Observations stable overnight, "
    "eating and drinking, mobilising with the physiotherapist. Plan discussed with the family.\n"
    "Bloods: sodium 138, potassium 4.1, creatinine 92, CRP trending down.\n\n"
)
TITLES = ["History of present illness", "Progress", "MEDICATIONS", "Plan", "Investigations"]


def _discharge_summary(chars: int) -> str:
    out, n = [], 0
    while sum(map(len, out)) < chars:
        out.append(SECTION.format(title=TITLES[n % len(TITLES)], n=n))
        n += 1
    return "".join(out)


def _check_cover(text: str, spans: list[tuple[int, int]], budget: int) -> None:
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (a, b), (c, d) in pairwise(spans):
        assert a < c <= b < d  # in order, overlapping or touching, never a gap, always moving on
    for a, b in spans:
        assert 0 < estimate_text_tokens(text[a:b]) <= budget


def test_a_note_that_fits_is_one_piece() -> None:
    assert split_note("Seen in clinic. BP 124/78.", 100) == [(0, 26)]


def test_a_40k_character_summary_is_cut_at_its_section_headings_with_overlap() -> None:
    note = _discharge_summary(40_000)
    spans = split_note(note, 1500)
    _check_cover(note, spans, 1500)
    assert 7 <= len(spans) <= 12
    for _, b in spans[:-1]:
        # each piece ends where a section starts: the next line is a heading
        assert re.match(r"[A-Za-z ]+:\n", note[b:]), note[b - 20 : b + 30]
    starts = [a for a, _ in spans[1:]]
    ends = [b for _, b in spans[:-1]]
    assert any(a < b for a, b in zip(starts, ends, strict=True))  # the pieces overlap a little
    assert all(note[a - 1] == "\n" or note[a - 1] == " " for a in starts)  # never mid-word


def test_chinese_without_line_breaks_is_cut_after_a_full_stop() -> None:
    note = "患者男，七十岁，高血压病史十年，规律服用氨氯地平。" * 400
    spans = split_note(note, 1000)
    _check_cover(note, spans, 1000)
    assert all(note[b - 1] == "。" for _, b in spans[:-1])


def test_text_without_any_boundary_is_still_covered() -> None:
    note = "x" * 10_000
    spans = split_note(note, 500)
    _check_cover(note, spans, 500)


@settings(max_examples=60, deadline=None)
@given(st.text(st.sampled_from("ab 。\n:高X."), min_size=1, max_size=3000), st.integers(2, 400))
def test_any_text_is_covered_in_order_within_the_budget(text: str, budget: int) -> None:
    spans = split_note(text, budget)
    if len(spans) == 1:
        assert spans == [(0, len(text))]
        return
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (a, b), (c, d) in pairwise(spans):
        assert a < c <= b < d
    for a, b in spans:  # a single wide character may be more than a tiny budget alone
        assert estimate_text_tokens(text[a:b]) <= budget or b - a == 1


SCHEMA = {
    "type": "object",
    "properties": {
        "age": {"type": ["integer", "null"]},
        "diagnoses": {"type": "array", "items": {"type": "string"}},
        "medications": {
            "type": "array",
            "items": {"type": "object", "properties": {"name": {"type": "string"}, "dose": {"type": ["string", "null"]},
                                                       "frequency": {"type": ["string", "null"]}}},
        },
        "smoker": {"type": "boolean"},
        "vitals": {"type": "object", "properties": {"heart_rate_bpm": {"type": ["integer", "null"]}}},
    },
}


def test_lists_are_unioned_in_note_order_without_repeats() -> None:
    answers = [
        {"diagnoses": ["Hypertension", "type 2 diabetes"], "medications": [{"name": "aspirin", "dose": "81 mg", "frequency": None}]},
        {"diagnoses": ["hypertension ", "CKD stage 3"],
         "medications": [{"name": "Aspirin", "dose": None, "frequency": "daily"},
                         {"name": "aspirin", "dose": "300 mg", "frequency": "once"}]},
    ]
    merged = merge_answers(answers, SCHEMA, ["", ""])
    assert merged["diagnoses"] == ["Hypertension", "type 2 diabetes", "CKD stage 3"]
    # the same aspirin seen in two pieces is one item with both its fields; a different dose is another
    assert merged["medications"] == [
        {"name": "aspirin", "dose": "81 mg", "frequency": "daily"},
        {"name": "aspirin", "dose": "300 mg", "frequency": "once"},
    ]


def test_a_single_value_is_the_grounded_one_then_the_most_agreed_then_the_earliest() -> None:
    pieces = ["A 70 year old man.", "Age 71 on the form.", "He is 71.", "No age here."]
    answers = [{"age": 70}, {"age": 71}, {"age": 71}, {"age": 55}]  # 55 is in no piece
    assert merge_answers(answers, SCHEMA, pieces)["age"] == 71  # grounded twice beats grounded once
    assert merge_answers(answers[:2] + answers[3:], SCHEMA, pieces[:2] + pieces[3:])["age"] == 70  # tie: earliest
    assert merge_answers([{"age": 55}, {"age": 70}], SCHEMA, ["No age here.", "A 70 year old man."])["age"] == 70
    assert merge_answers([{"age": None}, {"age": None}], SCHEMA, ["", ""])["age"] is None


def test_yes_when_any_piece_says_yes_and_objects_merge_field_by_field() -> None:
    answers = [{"smoker": False, "vitals": {"heart_rate_bpm": None}}, {"smoker": True, "vitals": {"heart_rate_bpm": 88}}]
    merged = merge_answers(answers, SCHEMA, ["Seen today.", "Smoker. HR 88."])
    assert merged == {"smoker": True, "vitals": {"heart_rate_bpm": 88}}
