"""Evidence: each extracted value located in the note, as offsets into the original text."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from medq.core.schemas import SchemaLoader
from tests.helpers import assert_evidence_slices_note_to_values, free_port
from worker.extract.evidence import (
    Locator,
    drop_unsupported,
    locate,
    normalize,
    unsupported_paths,
)
from worker.extract.processor import Extraction, MedicalDataProcessor

SCHEMA = SchemaLoader().get("clinical_note").json_schema


def _found(note: str, value: Any) -> list[str]:
    """The note's text at each span, so a table reads as what a reviewer would see."""
    spans = Locator(note).find(value)
    for a, b in spans:  # whatever the case: a span's text normalises to the value
        if isinstance(value, str):
            assert normalize(note[a:b]) == normalize(value)
        else:
            assert Decimal(normalize(note[a:b]).replace("\u2212", "-")) == Decimal(repr(value))
    return [note[a:b] for a, b in spans]


@pytest.mark.parametrize(("note", "value", "texts"), [
    # case, width and whitespace
    ("PMH: Hypertension.", "hypertension", ["Hypertension"]),
    ("Allergic to PENICILLIN", "Penicillin", ["PENICILLIN"]),
    ("Metformin 500mg daily", "500 mg", ["500mg"]),
    ("Metformin 500 mg daily", "500mg", ["500 mg"]),
    ("Metformin 500\n  mg daily", "500 mg", ["500\n  mg"]),
    ("心率７２次/分", 72, ["７２"]),
    ("ＢＰ １２４／７８", "bp 124/78", ["ＢＰ １２４／７８"]),
    ("Dose: 10 ＭＧ", "10 mg", ["10 ＭＧ"]),
    # Chinese: no spaces, no word boundaries
    ("患者男，72岁，高血压病史10年，服用氨氯地平5mg每日一次。", "高血压", ["高血压"]),
    ("患者男，72岁，高血压病史10年，服用氨氯地平5mg每日一次。", 72, ["72"]),
    ("患者男，72岁，高血压病史10年，服用氨氯地平5mg每日一次。", "氨氯地平", ["氨氯地平"]),
    ("患者男，72岁，高血压病史10年，服用氨氯地平5mg每日一次。", "5 mg", ["5mg"]),
    ("患者男，72岁，高血压病史10年，服用氨氯地平5mg每日一次。", 10, ["10"]),
    # a number, or a word, inside another is not it
    ("72-year-old, pulse 72.", 7, []),
    ("72-year-old, pulse 72.", 2, []),
    ("aspirin 25 mg", "5 mg", []),
    ("colchicine 0.5 mg", "5 mg", []),
    ("colchicine 0.5 mg", 0.5, ["0.5"]),
    ("colchicine 0.5 mg", 5, []),
    ("T 37.5 C", 37, []),
    ("T 37.5 C", 7.5, []),
    ("vitamin B12 1 mg", "B1", []),
    ("vitamin B12 1 mg", 12, ["12"]),
    ("a 50-year-old female", "male", []),
    ("a 50-year-old female", "female", ["female"]),
    ("HR 98 72 yo", 72, ["72"]),
    # numbers as written: whole tokens, any written form of the same value
    ("72-year-old man", 72, ["72"]),
    ("age: 72.", 72, ["72"]),
    ("T 37.80 C", 37.8, ["37.80"]),
    ("T 37.0 C", 37, ["37.0"]),
    ("T 37 C", 37.0, ["37"]),
    ("INR -0.5 change", -0.5, ["-0.5"]),
    ("2023-05-12", 5, ["05"]),
    # every occurrence, in order, none overlapping
    ("Aspirin 81 mg. Plan: continue aspirin 81 mg.", "aspirin 81 mg", ["Aspirin 81 mg", "aspirin 81 mg"]),
    ("BP 120/80, repeat 120/80", 120, ["120", "120"]),
    ("q6h q6h q6h", "q6h q6h", ["q6h q6h"]),  # the third alone is not the value
    ("aa aaa aa", "aa", ["aa", "aa"]),
    # nothing to find
    ("Never smoker.", "asthma", []),
    ("Never smoker.", True, []),
    ("Never smoker.", "  ", []),
])
def test_locator(note: str, value: Any, texts: list[str]) -> None:
    assert _found(note, value) == texts


def test_offsets_are_into_the_original_text_whatever_normalisation_did() -> None:
    # ligature (one char, two folded), ß (one char, "ss"), a combining accent, full-width
    note = "ﬁbrosis; Straße; cafe\u0301 au lait; ＨＲ ８８"
    assert _found(note, "fibrosis") == ["ﬁbrosis"]
    assert _found(note, "STRASSE") == ["Straße"]
    assert _found(note, "café") == ["cafe\u0301"]
    assert _found(note, 88) == ["８８"]
    assert _found(note, "s") == []  # half of "ß" is not a span: spans cover whole characters
    assert Locator(note).find(88) == [(len(note) - 2, len(note))]


def test_evidence_maps_each_value_path_to_its_spans() -> None:
    note = "72-year-old male. PMH: hypertension, 高血压. Metformin 500mg twice daily. HR 88. Never smoker."
    data = {
        "age": 72, "sex": "male", "diagnoses": ["hypertension", "高血压", "asthma"],
        "medications": [{"name": "metformin", "dose": "500 mg", "frequency": "twice daily"}],
        "allergies": [], "smoking_status": "never",
        "vitals": {"temperature_c": None, "heart_rate_bpm": 88, "systolic_bp_mmhg": None,
                   "diastolic_bp_mmhg": None, "spo2_pct": None},
    }
    evidence = locate(data, SCHEMA, note)
    assert {path: [note[a:b] for a, b in spans] for path, spans in evidence.items()} == {
        "age": ["72"], "sex": ["male"], "diagnoses[0]": ["hypertension"], "diagnoses[1]": ["高血压"],
        "medications[0].name": ["Metformin"], "medications[0].dose": ["500mg"],
        "medications[0].frequency": ["twice daily"], "vitals.heart_rate_bpm": ["88"],
        "smoking_status": ["Never"],  # an enum gets evidence where its word occurs
    }
    assert unsupported_paths(data, SCHEMA, evidence) == ["diagnoses[2]"]


def test_enums_are_never_unsupported_and_invented_values_are_dropped_by_path() -> None:
    note = "67-year-old man with hypertension. Metformin 500 mg."
    data = {
        "age": 28, "sex": "male", "diagnoses": ["asthma", "hypertension"],
        "medications": [{"name": "Wyvernol", "dose": None, "frequency": None},
                        {"name": "metformin", "dose": "850 mg", "frequency": None}],
        "allergies": [], "smoking_status": "former",
        "vitals": {"temperature_c": None, "heart_rate_bpm": None, "systolic_bp_mmhg": None,
                   "diastolic_bp_mmhg": None, "spo2_pct": None},
    }
    paths = unsupported_paths(data, SCHEMA, locate(data, SCHEMA, note))
    # "male" is chosen from "man" and "former" from nothing: categories, not copies
    assert paths == ["age", "diagnoses[0]", "medications[0].name", "medications[1].dose"]
    cleaned = drop_unsupported(data, SCHEMA, paths)
    assert cleaned["age"] is None and cleaned["diagnoses"] == ["hypertension"]
    assert cleaned["medications"] == [{"name": "metformin", "dose": None, "frequency": None}]
    assert cleaned["sex"] == "male" and cleaned["smoking_status"] == "former"
    assert unsupported_paths(cleaned, SCHEMA, locate(cleaned, SCHEMA, note)) == []


# ------------------------------------------------------------------ through the processor

NOTE = "CANARY-P1 Mr Lee is a 72-year-old male with hypertension. Metformin 500 mg twice daily. Never smoker."


def test_the_processor_gives_evidence_for_each_value_it_copied(simulator: Callable[..., str]) -> None:
    proc = MedicalDataProcessor("sim-model", "sk-test", simulator(), SchemaLoader())
    ex = proc.process(NOTE, "clinical_note", record_id="r1")  # the simulator copies phrases of the note
    data = ex.data_dict()
    assert ex.evidence["age"] == [[NOTE.index("72"), NOTE.index("72") + 2]]
    assert set(ex.evidence) >= {"age", "diagnoses[0]", "medications[0].name"}
    assert_evidence_slices_note_to_values(NOTE, data, ex.evidence)
    assert ex.provenance.ungrounded_fields == []


class _Answering:
    """A chat-completions server of the test's own that answers every request with ``content``."""

    def __init__(self, content: str) -> None:
        body = json.dumps({
            "id": "c1", "object": "chat.completion", "created": 0, "model": "fixed",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100000, "completion_tokens": 50, "total_tokens": 100050},
        }).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def answering() -> Iterator[Callable[[dict[str, Any]], str]]:
    servers: list[_Answering] = []

    def start(answer: dict[str, Any]) -> str:
        servers.append(_Answering(json.dumps(answer, ensure_ascii=False)))
        return servers[-1].base_url

    yield start
    for s in servers:
        s.httpd.shutdown()
        s.httpd.server_close()


MIXED_NOTE = "患者男，67岁。高血压10年。Metformin 500mg bid, aspirin 25 mg qd. Seen with his wife."
MIXED = {  # a model that copied some values and invented others
    "age": 76, "sex": "male", "diagnoses": ["糖尿病", "高血压"],
    "medications": [{"name": "Wyvernol", "dose": None, "frequency": None},
                    {"name": "aspirin", "dose": "5 mg", "frequency": None},  # "5 mg" is not in "25 mg"
                    {"name": "metformin", "dose": "500 mg", "frequency": "BID"}],
    "allergies": [], "smoking_status": "never",
    "vitals": {"temperature_c": None, "heart_rate_bpm": None, "systolic_bp_mmhg": None,
               "diastolic_bp_mmhg": None, "spo2_pct": None},
}


def _process(base_url: str, grounding: str) -> Extraction:
    proc = MedicalDataProcessor("fixed", "sk-test", base_url, SchemaLoader(), grounding=grounding)  # type: ignore[arg-type]
    return proc.process(MIXED_NOTE, "clinical_note", record_id="r1")


def test_flag_lists_exactly_the_values_without_evidence(answering: Callable[[dict[str, Any]], str]) -> None:
    ex = _process(answering(MIXED), "flag")
    assert ex.provenance.ungrounded_fields == ["age", "diagnoses[0]", "medications[0].name", "medications[1].dose"]
    assert ex.data_dict() == MIXED and ex.provenance.dropped_fields == []
    cut = {path: [MIXED_NOTE[a:b] for a, b in spans] for path, spans in ex.evidence.items()}
    assert cut == {"diagnoses[1]": ["高血压"], "medications[1].name": ["aspirin"], "medications[2].name": ["Metformin"],
                   "medications[2].dose": ["500mg"], "medications[2].frequency": ["bid"]}


def test_drop_removes_them_and_the_evidence_follows_the_items_that_moved_up(
    answering: Callable[[dict[str, Any]], str]
) -> None:
    ex = _process(answering(MIXED), "drop")
    data = ex.data_dict()
    assert ex.provenance.dropped_fields == ["age", "diagnoses[0]", "medications[0].name", "medications[1].dose"]
    assert data["age"] is None and data["diagnoses"] == ["高血压"]
    assert data["medications"] == [{"name": "aspirin", "dose": None, "frequency": None},
                                   {"name": "metformin", "dose": "500 mg", "frequency": "BID"}]
    assert data["sex"] == "male" and data["smoking_status"] == "never"  # categories are not dropped
    assert ex.evidence["diagnoses[0]"] == [[MIXED_NOTE.index("高血压"), MIXED_NOTE.index("高血压") + 3]]
    assert ex.evidence["medications[1].dose"] == [[MIXED_NOTE.index("500mg"), MIXED_NOTE.index("500mg") + 5]]
    assert_evidence_slices_note_to_values(MIXED_NOTE, data, ex.evidence)


# ------------------------------------------------------------------ properties

_CHARS = st.sampled_from(list("abcAB xyz 0123456789.,-/\n\t") + list("ＡＢ０１２３ ") + list("高血压患者岁，。")
                         + ["ß", "ﬁ", "\u0301", "é", "İ", "\u00a0", "Σ", "ς"])
_TEXT = st.text(_CHARS, max_size=40)


@settings(max_examples=300, deadline=None)
@given(note=_TEXT, value=_TEXT)
@example(note="Straße", value="s")
@example(note="a\u0301", value="a")
@example(note=" \u0301", value="\u0301")
def test_every_span_slices_the_note_to_the_value(note: str, value: str) -> None:
    spans = Locator(note).find(value)
    assert spans == sorted(spans)
    for (_, b), (c, _) in pairwise(spans):
        assert b <= c  # no overlaps
    for a, b in spans:
        assert normalize(note[a:b]) == normalize(value)


@settings(max_examples=200, deadline=None)
@given(before=_TEXT, value=_TEXT.filter(lambda v: bool(normalize(v))), after=_TEXT)
def test_a_value_copied_from_the_note_is_found(before: str, value: str, after: str) -> None:
    note = f"{before} {value} {after}"
    assert Locator(note).find(value), "a value standing as its own word in the note has evidence"


@settings(max_examples=200, deadline=None)
@given(before=_TEXT, number=st.one_of(st.integers(-500, 5000),
                                      st.decimals(-100, 1000, places=2).map(float)), after=_TEXT)
def test_a_number_copied_from_the_note_is_found_and_its_spans_are_that_number(
    before: str, number: float, after: str
) -> None:
    note = f"{before} {number} {after}"
    spans = Locator(note).find(number)
    assert spans
    for a, b in spans:
        assert Decimal(normalize(note[a:b])) == Decimal(repr(number))
