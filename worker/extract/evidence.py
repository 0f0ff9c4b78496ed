"""Evidence: where in the note each extracted value was read, as character offsets.

A clinician or a reviewer must see where each value came from, and a value with no
source must not pass as fact. medq locates every value in the note itself (the model
is not asked to quote: a model that invents a value invents a quote as easily, and
locating is exact where it applies):

- a **string** matches where the note's text equals it after normalising case
  (``casefold``), width (NFKC: full-width ``７２`` and ``ＭＧ`` are ``72`` and ``mg``)
  and whitespace (``500mg`` is ``500 mg``; Chinese needs no spaces at all). A match
  never starts or ends inside a number or a word of a script written with spaces:
  ``5 mg`` is not in ``25 mg`` nor ``0.5 mg``, ``male`` is not in ``female``; Chinese,
  Japanese and Thai text has no word boundaries to keep, so any substring counts.
- a **number** matches a number written in the note with the same value, as a whole
  token: ``72`` in ``72-year-old`` and ``72岁``, ``37.8`` as ``37.8`` or ``37.80``,
  never ``7`` inside ``72`` or ``7.5``. Numbers in words (``seventy``, ``七十二``) and
  with thousands separators are not read.
- an **enum** value (a category the model chose, such as ``sex``) gets evidence when the
  word itself occurs (``never`` in "never smoked"), and is never listed as without
  evidence: ``male`` is rightly chosen from "67-year-old man".
- booleans are judgements, like enums, but no word stands for them: no evidence, never
  listed. A string that is empty after normalising carries nothing to find: the same.

Offsets are Python ``str`` indices into the note exactly as given (``note[a:b]``),
found through a map from each character of the normalised text back to the original
character (or combining sequence) it came from, so spans always cover whole original
characters.

Every value not null, not an enum or boolean, and without a span is *ungrounded*:
``unsupported_paths`` lists them ("medications[1].dose") and ``drop_unsupported``
removes them (nullable values become null, list items go).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

Span = tuple[int, int]
Evidence = dict[str, list[list[int]]]  # path -> [[start, end], ...], as the result document holds it

_SPACE = re.compile(r"\s+")
# Letters of scripts that separate words with spaces; CJK, kana, Hangul (particles are
# glued to words), Thai, Lao, Myanmar and Khmer do not, so a match may start anywhere.
_SPACED_LETTER = r"[^\W\d_\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u2e80-\U0010ffff]"
_NUMBER = re.compile(r"(?<!\d)(?<!\d\.)[-\u2212]?\d+(?:\.\d+)?(?!\.?\d)")


def _groups(text: str) -> list[Span]:
    """Each character with the combining marks that follow it: NFKC composes those."""
    spans: list[Span] = []
    for i, ch in enumerate(text):
        if spans and unicodedata.combining(ch):
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def _fold(s: str) -> str:
    return unicodedata.normalize("NFKC", s).casefold()


def normalize(s: str) -> str:
    """What a value is compared by: case, width and whitespace folded away."""
    return _SPACE.sub("", "".join(_fold(s[a:b]) for a, b in _groups(s)))


@dataclass(frozen=True)
class _View:
    """The note folded (whitespace kept), and for each folded character the original
    character group it came from: ``starts[i]``, ``ends[i]``."""

    text: str
    starts: list[int]
    ends: list[int]

    @classmethod
    def of(cls, note: str) -> _View:
        parts: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        for a, b in _groups(note):
            folded = _fold(note[a:b])
            if not folded.isspace():  # a space NFKC put inside a group ("¨" is " ̈") is no boundary
                folded = _SPACE.sub("", folded)
            parts.append(folded)
            starts += [a] * len(folded)
            ends += [b] * len(folded)
        return cls("".join(parts), starts, ends)

    def span(self, i: int, j: int) -> Span | None:
        """The original span of folded ``text[i:j]``; None if it splits a group (``ß`` is ``ss``)."""
        if i > 0 and self.starts[i - 1] == self.starts[i]:
            return None
        if j < len(self.text) and self.starts[j] == self.starts[j - 1]:
            return None
        return self.starts[i], self.ends[j - 1]


class Locator:
    """Finds values in one note. Build once per note; ``find`` is called per value."""

    def __init__(self, note: str) -> None:
        self.note = note
        self._view = _View.of(note)
        self._numbers: list[tuple[int, int, Decimal]] | None = None

    def find(self, value: Any) -> list[Span]:
        """All non-overlapping spans of ``value`` in the note, in order.

        All, not the first: the locator cannot tell which mention the model read (a dose
        in the medication list and again in the plan), and showing only the first would
        present a guess as the source; a reviewer sees each place and judges.
        """
        if isinstance(value, bool) or value is None:
            return []
        if isinstance(value, (int, float)):
            return self._find_number(value)
        if isinstance(value, str):
            return self._find_string(value)
        return []

    def _find_string(self, value: str) -> list[Span]:
        needle = normalize(value)
        if not needle:
            return []
        pattern = _string_pattern(needle)
        view, spans, pos = self._view, [], 0
        while (m := pattern.search(view.text, pos)) is not None:
            span = view.span(m.start(), m.end())
            if span is None:
                pos = m.start() + 1  # a match splitting a character: look on from the next one
                continue
            spans.append(span)
            pos = m.end()
        return spans

    def _find_number(self, value: float) -> list[Span]:
        try:
            wanted = Decimal(repr(value))
        except InvalidOperation:  # nan, inf
            return []
        if self._numbers is None:
            self._numbers = []
            for m in _NUMBER.finditer(self._view.text):
                span = self._view.span(m.start(), m.end())
                if span is not None:
                    self._numbers.append((*span, Decimal(m.group().replace("\u2212", "-"))))
        return [(a, b) for a, b, number in self._numbers if number == wanted]


def _string_pattern(needle: str) -> re.Pattern[str]:
    # whitespace may stand between any two characters: "500mg" is "500 mg"
    body = r"\s*".join(re.escape(ch) for ch in needle)
    return re.compile(_edge_before(needle[0]) + body + _edge_after(needle[-1]))


def _edge_before(ch: str) -> str:
    if ch.isdigit():
        return r"(?<!\d)(?<!\d\.)"
    return rf"(?<!{_SPACED_LETTER})" if re.fullmatch(_SPACED_LETTER, ch) else ""


def _edge_after(ch: str) -> str:
    if ch.isdigit():
        return r"(?!\.?\d)"
    return rf"(?!{_SPACED_LETTER})" if re.fullmatch(_SPACED_LETTER, ch) else ""


# ---------------------------------------------------------------- over an extraction


def _is_choice(prop: dict[str, Any]) -> bool:
    return "enum" in prop


def _scalars(value: Any, prop: dict[str, Any], path: str) -> list[tuple[str, Any, bool]]:
    """(path, value, is a choice) for every non-null scalar of ``value``, in order."""
    if value is None:
        return []
    if isinstance(value, list):
        items = prop.get("items", {})
        return [s for i, item in enumerate(value) for s in _scalars(item, items, f"{path}[{i}]")]
    if isinstance(value, dict):
        props = prop.get("properties", {})
        return [s for k, v in value.items() for s in _scalars(v, props.get(k, {}), f"{path}.{k}" if path else k)]
    return [(path, value, _is_choice(prop))]


_PATH_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


def value_at(data: Any, path: str) -> Any:
    """The value at an evidence path: ``value_at(data, "medications[1].dose")``."""
    for m in _PATH_STEP.finditer(path):
        data = data[m.group(1)] if m.group(1) is not None else data[int(m.group(2))]
    return data


def _needs_evidence(value: Any, choice: bool) -> bool:
    if choice or isinstance(value, bool):
        return False
    return not (isinstance(value, str) and not normalize(value))


def locate(data: dict[str, Any], json_schema: dict[str, Any], note: str) -> Evidence:
    """Evidence for ``data`` (an extraction as JSON) in ``note``: path -> spans, for the
    values found; values without a span have no key."""
    finder = Locator(note)
    out: Evidence = {}
    for path, value, _ in _scalars(data, json_schema, ""):
        spans = finder.find(value)
        if spans:
            out[path] = [[a, b] for a, b in spans]
    return out


def unsupported_paths(data: dict[str, Any], json_schema: dict[str, Any], evidence: Evidence) -> list[str]:
    """Paths of the values in ``data`` that need evidence and have none in ``evidence``, in order."""
    return [path for path, value, choice in _scalars(data, json_schema, "")
            if _needs_evidence(value, choice) and path not in evidence]


def ungrounded_paths(data: dict[str, Any], json_schema: dict[str, Any], note: str) -> list[str]:
    """Paths of the values in ``data`` that need evidence and have none in ``note``."""
    return unsupported_paths(data, json_schema, locate(data, json_schema, note))


def _nullable(prop: dict[str, Any]) -> bool:
    t = prop.get("type")
    return t == "null" or (isinstance(t, list) and "null" in t) or None in prop.get("enum", [object()])


def drop_unsupported(data: dict[str, Any], json_schema: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """A copy of ``data`` without the values at ``paths``: nullable ones become null, list
    items go, and an object that loses a required non-nullable value goes with it."""
    doomed = set(paths)

    def clean(value: Any, prop: dict[str, Any], path: str) -> tuple[bool, Any]:
        """(keep, cleaned value); keep False: the value goes and cannot be null."""
        if isinstance(value, list):
            items = prop.get("items", {})
            kept = []
            for i, item in enumerate(value):
                ok, cleaned = clean(item, items, f"{path}[{i}]")
                if ok:
                    kept.append(cleaned)
            return True, kept
        if isinstance(value, dict):
            props = prop.get("properties", {})
            out: dict[str, Any] = {}
            for key, sub in value.items():
                ok, cleaned = clean(sub, props.get(key, {}), f"{path}.{key}" if path else key)
                if not ok:
                    return False, None  # a required, non-nullable part is invented: the item goes
                out[key] = cleaned
            return True, out
        if path not in doomed:
            return True, value
        return (True, None) if _nullable(prop) else (False, None)

    _, cleaned = clean(data, json_schema, "")
    return cleaned if isinstance(cleaned, dict) else data


def drop_ungrounded(data: dict[str, Any], json_schema: dict[str, Any], note: str) -> dict[str, Any]:
    """A copy of ``data`` without the values that have no evidence in ``note``."""
    return drop_unsupported(data, json_schema, ungrounded_paths(data, json_schema, note))
