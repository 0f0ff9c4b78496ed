"""A note longer than the endpoint's context: split it, extract each piece, merge.

**Splitting.** A piece is at most ``budget`` tokens (``medq.core.tokens`` estimate). When a
piece is full, it ends at the best boundary in the second half of the room it has, best
first: a section heading ("MEDICATIONS:", "Discharge diagnoses:", "【诊断】", "二、",
"# Plan"), a blank line (a paragraph), a line end, a sentence end (". ", "。"), a space;
only a run of text with none of these is cut between two characters. The next piece
starts a little before the cut (``overlap`` tokens, at a line or sentence boundary), so a
fact written across the cut is whole in one of them.

**Merging** (each piece's answer is valid for the schema; the merge is too):

- a **list** is the union of the pieces' lists in note order, without duplicates: items
  equal after normalising case, width and whitespace are one item, and two objects that
  agree on every field both have (``{aspirin, 81 mg, null}`` and ``{aspirin, null, daily}``)
  are one, with the fields filled from both;
- an **object** is merged field by field, by these same rules;
- a **single value** (a string, number or choice) is, among the pieces' non-null answers,
  first those found in their own piece's text (grounded), then the value most pieces
  agree on, then the earliest in the note. A yes/no field is yes when a piece says yes
  (a piece that does not mention smoking answers no).

Evidence is located afterwards in the whole note, so its offsets are into the note as
enqueued, not into a piece.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from typing import Any

from medq.core.tokens import estimate_text_tokens
from worker.extract.evidence import Locator, normalize

Span = tuple[int, int]

# Boundary levels, best first. A heading: a short line that is only a title ending in a
# colon ("Discharge medications:", "诊断："), an all-caps line, a markdown heading, a
# Chinese 【bracketed】 or "一、" numbered heading. ("Day 3: stable" is a line, not a heading.)
_HEADING = re.compile(
    r"(?m)^[ \t]*(?:#{1,6}[ \t]|【[^】\n]{1,30}】|[一二三四五六七八九十]{1,3}[、.．]"
    r"|[A-Z][A-Za-z0-9 /&(),'-]{1,60}:[ \t]*$|[\u4e00-\u9fff][^\n:：]{0,15}[:：][ \t]*$"
    r"|[A-Z][A-Z0-9 /&(),'-]{2,60}[ \t]*$)"
)
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_LINE = re.compile(r"\n")
_SENTENCE = re.compile(r"(?<=[.!?;])\s+|(?<=[。！？；])")
_SPACE = re.compile(r"\s+")
_LEVELS = (_HEADING, _PARAGRAPH, _LINE, _SENTENCE, _SPACE)
_OVERLAP_LEVEL = 3  # the next piece may start at a line or sentence boundary, not mid-sentence


def _boundaries(text: str) -> list[tuple[int, int]]:
    """(position, level) of every place a piece may end; the best level per position."""
    best: dict[int, int] = {}
    for level, pattern in enumerate(_LEVELS):
        for m in pattern.finditer(text):
            pos = m.start() if level == 0 else m.end()
            if 0 < pos < len(text) and best.get(pos, 99) > level:
                best[pos] = level
    return sorted(best.items())


class _Counter:
    """Token estimates of ``text[a:b]`` from prefix sums, so a split is linear, not quadratic."""

    def __init__(self, text: str) -> None:
        self._cum = [0]
        total = 0
        for ch in text:
            total += estimate_text_tokens(ch * 4)  # a wide character 4, a narrow one 1, per 4
            self._cum.append(total)

    def tokens(self, a: int, b: int) -> float:
        return (self._cum[b] - self._cum[a]) / 4

    def furthest(self, a: int, budget: float) -> int:
        """The largest b with tokens(a, b) <= budget (at least a + 1: a piece is never empty)."""
        b = bisect.bisect_right(self._cum, self._cum[a] + budget * 4) - 1
        return max(b, a + 1)


def split_note(text: str, budget: int, overlap: int | None = None) -> list[Span]:
    """Spans ``(start, end)`` of ``text``, each at most ``budget`` tokens, covering it in
    order, consecutive ones overlapping by about ``overlap`` tokens (default a tenth of
    the budget, at most 200). One span when the note fits."""
    if budget < 1:
        raise ValueError("budget must be at least 1 token")
    if estimate_text_tokens(text) <= budget:  # most notes: one C-level pass, no per-character work
        return [(0, len(text))]
    counter = _Counter(text)
    overlap = min(budget // 10, 200) if overlap is None else overlap
    bounds = _boundaries(text)
    positions = [p for p, _ in bounds]
    pieces: list[Span] = []
    start = 0
    while True:
        limit = counter.furthest(start, budget)
        if limit >= len(text):
            pieces.append((start, len(text)))
            return pieces
        lo = bisect.bisect_right(positions, start + (limit - start) // 2)
        hi = bisect.bisect_right(positions, limit)
        window = bounds[lo:hi]
        # the best level, and the last place at that level: as full a piece as it can be
        cut = min(window, key=lambda b: (b[1], -b[0]))[0] if window else limit
        pieces.append((start, cut))
        start = _overlap_start(bounds, positions, counter, start, cut, overlap)


def _overlap_start(
    bounds: list[tuple[int, int]], positions: list[int], counter: _Counter, start: int, cut: int, overlap: int
) -> int:
    """The earliest line or sentence boundary before ``cut`` within ``overlap`` tokens of it,
    after ``start`` (the next piece must move on); ``cut`` when there is none."""
    i = bisect.bisect_left(positions, cut)
    best = cut
    while i > 0:
        i -= 1
        pos, level = bounds[i]
        if pos <= start or counter.tokens(pos, cut) > overlap:
            break
        if level <= _OVERLAP_LEVEL:
            best = pos
    return best


# ------------------------------------------------------------------ merging


def merge_answers(answers: Sequence[dict[str, Any]], json_schema: dict[str, Any], pieces: Sequence[str]) -> dict[str, Any]:
    """One answer from each piece's answer (in note order), by the rules above."""
    locators = [Locator(p) for p in pieces]
    merged = _merge(list(answers), json_schema, locators)
    return merged if isinstance(merged, dict) else {}


def _types(prop: dict[str, Any]) -> list[str]:
    t = prop.get("type")
    return [str(x) for x in t] if isinstance(t, list) else [str(t)] if t else []


def _merge(values: list[Any], prop: dict[str, Any], locators: list[Locator]) -> Any:
    present = [(i, v) for i, v in enumerate(values) if v is not None]
    if not present:
        return values[0] if values else None
    types = _types(prop)
    if "array" in types or all(isinstance(v, list) for _, v in present):
        return _union([item for _, v in present if isinstance(v, list) for item in v])
    if "object" in types or all(isinstance(v, dict) for _, v in present):
        props = prop.get("properties", {})
        keys = list(dict.fromkeys(k for _, v in present if isinstance(v, dict) for k in v))
        return {k: _merge([v.get(k) if isinstance(v, dict) else None for v in values], props.get(k, {}), locators)
                for k in keys}
    if all(isinstance(v, bool) for _, v in present):
        return any(v for _, v in present)
    return _single(present, locators)


def _single(present: list[tuple[int, Any]], locators: list[Locator]) -> Any:
    """Grounded in its piece first, then the most pieces, then the earliest piece."""
    votes: dict[str, list[int]] = {}
    grounded: dict[str, bool] = {}
    first: dict[str, Any] = {}
    for i, v in present:
        key = same_key(v)
        votes.setdefault(key, []).append(i)
        first.setdefault(key, v)
        grounded[key] = grounded.get(key, False) or bool(locators[i].find(v) if i < len(locators) else False)
    best = min(votes, key=lambda k: (not grounded[k], -len(votes[k]), votes[k][0]))
    return first[best]


def same_key(value: Any) -> str:
    """Equal for values that say the same: case, width and whitespace aside. The one
    test of "the same item", here and in ``worker.extract.runaway.dedupe_lists``."""
    if isinstance(value, str):
        return "s:" + normalize(value)
    if isinstance(value, dict):
        return "o:" + json.dumps({k: same_key(v) for k, v in sorted(value.items())}, ensure_ascii=False)
    if isinstance(value, list):
        return "l:" + json.dumps([same_key(v) for v in value], ensure_ascii=False)
    return "v:" + json.dumps(value)


def _union(items: list[Any]) -> list[Any]:
    """Items in order, each once; objects that agree where both have a value are one."""
    out: list[Any] = []
    seen: set[str] = set()
    for item in items:
        key = same_key(item)
        if key in seen:
            continue
        if isinstance(item, dict):
            at = next((j for j, o in enumerate(out) if isinstance(o, dict) and _agree(o, item)), None)
            if at is not None:
                out[at] = {**item, **{k: v for k, v in out[at].items() if v is not None}}
                seen.add(key)
                continue
        seen.add(key)
        out.append(item)
    return out


def _agree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Both name at least one field alike and contradict each other in none."""
    shared = [k for k in a if k in b and a[k] is not None and b[k] is not None]
    return bool(shared) and all(same_key(a[k]) == same_key(b[k]) for k in shared)
