"""The review page built from result documents and notes: each mark holds exactly the words
of its evidence, notes are escaped, overlapping spans show the text once, values without
evidence and wrong values are marked, and the file is written for its owner only."""

from __future__ import annotations

import re
import stat
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from medq.tools.review import Note, build, write_private

NOTE = "Mr Lee, 72-year-old male. <script>alert('x')</script> Metformin 500 mg twice daily. Never smoker."


def _span(note: str, words: str) -> list[int]:
    a = note.index(words)
    return [a, a + len(words)]


def _doc(rid: str, job_id: str, data: dict[str, Any] | None, evidence: dict[str, list[list[int]]],
         ungrounded: list[str] | None = None, status: str = "succeeded") -> dict[str, Any]:
    return {"id": rid, "job_id": job_id, "batch": "b1", "schema": "clinical_note", "schema_version": 1,
            "status": status, "data": data, "error": None, "evidence": evidence,
            "provenance": {"ungrounded_fields": ungrounded or []}}


class _Text(HTMLParser):
    """The visible text of the notes (<pre class="note">), with marks left out of nothing."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.notes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "pre":
            self.depth += 1
            self.notes.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.notes[-1] += data


def _notes_shown(page: str) -> list[str]:
    parser = _Text()
    parser.feed(page)
    return parser.notes


def _marks(page: str, path: str) -> list[str]:
    """The raw HTML inside each <mark> whose data-path names ``path``."""
    found = re.findall(r'<mark [^>]*data-path="([^"]*)"[^>]*>(.*?)</mark>', page, flags=re.DOTALL)
    return [inner for paths, inner in found if path in paths.split(" ")]


def test_each_mark_holds_the_words_its_evidence_points_at_and_the_note_is_escaped() -> None:
    data = {"age": 72, "medications": [{"name": "Metformin", "dose": "500 mg"}], "diagnoses": ["gout"]}
    evidence = {"age": [_span(NOTE, "72")], "medications[0].name": [_span(NOTE, "Metformin")],
                "medications[0].dose": [_span(NOTE, "500 mg")]}
    page = build("b1", [_doc("en", "j1", data, evidence, ["diagnoses[0]"])], {"j1": Note(NOTE, "notes file")})

    a, b = evidence["age"][0]
    inner = re.search(r'<mark [^>]*data-path="age"[^>]*>(.*?)</mark>', page).group(1)  # type: ignore[union-attr]
    assert inner == NOTE[a:b] == "72"
    assert _marks(page, "medications[0].dose") == ["500 mg"]
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert _notes_shown(page) == [NOTE]  # the whole note, once, in order, marks or not
    row = re.search(r'<tr class="([^"]*)" data-path="diagnoses\[0\]"', page)
    assert row is not None and "ungrounded" in row.group(1).split()
    assert "no evidence" in page and "1 value(s) without evidence" in page
    assert not re.search(r"https?://", page) and "default-src 'none'" in page  # nothing fetched


def test_overlapping_spans_show_the_note_once_and_each_value_whole() -> None:
    note = "Aspirin 81 mg daily; aspirin allergy."
    data = {"medications": [{"name": "Aspirin 81 mg", "dose": "81 mg daily"}], "allergies": ["aspirin"]}
    evidence = {"medications[0].name": [_span(note, "Aspirin 81 mg")],
                "medications[0].dose": [_span(note, "81 mg daily")],
                "allergies[0]": [[0, 7], _span(note, "aspirin")]}
    page = build("b1", [_doc("en", "j1", data, evidence)], {"j1": Note(note, "notes file")})

    assert _notes_shown(page) == [note]
    # a value's marks, read in order, spell its evidence exactly
    assert "".join(_marks(page, "medications[0].name")) == "Aspirin 81 mg"
    assert "".join(_marks(page, "medications[0].dose")) == "81 mg daily"
    assert 'class="overlap"' in page  # "81 mg" is inside both


def test_gold_marks_values_right_or_wrong_with_evals_matching_and_lists_what_was_missed() -> None:
    data = {"age": 71, "medications": [{"name": "metformin", "dose": "500mg"}, {"name": "Aspirin", "dose": None}],
            "diagnoses": []}
    gold = {"age": 72, "medications": [{"name": "Metformin", "dose": "500 mg"}, {"name": "Lisinopril", "dose": "10 mg"}],
            "diagnoses": []}
    page = build("b1", [_doc("en", "j1", data, {})], {"j1": Note(NOTE, "notes file")}, {"en": gold})

    def verdict(path: str) -> str:
        m = re.search(rf'<tr class="([^"]*)" data-path="{re.escape(path)}"', page)
        assert m is not None, path
        return m.group(1)

    assert "wrong" in verdict("age") and "wrong (gold: 72)" in page
    assert "right" in verdict("medications[0].name") and "right" in verdict("medications[0].dose")  # 500mg == 500 mg
    assert "wrong" in verdict("medications[1].name")  # not in gold
    assert "right" in verdict("diagnoses")  # both empty
    assert re.search(r'<tr class="missed" data-path="medications">.*?Lisinopril.*?missed', page)


def test_a_record_without_its_note_is_listed_with_its_extraction_and_why() -> None:
    page = build("b1", [_doc("en", "j1", {"age": 72}, {"age": [[8, 10]]})],
                 {"j1": Note(None, problem="its stored record is gone (deleted when the job succeeded)")})
    assert "No note shown: its stored record is gone" in page
    assert "<mark" not in page and 'data-path="age"' in page


def test_the_page_is_written_for_its_owner_only(tmp_path: Path) -> None:
    out = tmp_path / "review.html"
    out.write_text("old", encoding="utf-8")
    out.chmod(0o644)  # an older page, readable by all: replaced by one that is not
    write_private(out, "<p>PHI</p>")
    assert out.read_text(encoding="utf-8") == "<p>PHI</p>"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["review.html"]  # no temporary file left
