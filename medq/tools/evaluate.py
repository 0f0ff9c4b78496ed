"""Score extractions against gold labels, one row per field.

Pure functions: callers read the results and the gold file and pass dicts in;
``Report.as_dict()`` is what ``--json`` prints, and the CLI renders the rows.

Rows, in schema order, nested rows right after their parent:

    scalar field (string, integer, number, boolean, enum; nullable)   "age"
        kind accuracy: exact match after ``normalise``; numbers within
        ``NUMBER_TOLERANCE``; null == null is correct.
    object field                                                      "vitals.spo2_pct"
        each property is its own row, scored by the same rules (recursively).
    list of scalars                                                   "diagnoses"
        kind prf: precision / recall / F1 over items matched one-to-one
        (``match_items``: equal after normalising, else one contains the other).
    list of objects                                                   "medications"
        kind prf on the item key (the first required string property, "name"),
        plus one row per other property ("medications.dose"), scored as
        accuracy over the matched pairs only.

Averaging is micro: counts (correct values, true positives, predicted and gold
items) are summed over records before dividing, so a record with eight
medications weighs eight times one with a single medication. ``Report.macro`` is
the plain mean over rows of each row's score (accuracy, or F1 for prf rows), so
every field counts the same however many items it has; rows with nothing to
score (a nested row without any matched pair) are left out of it.

Rules where a choice had to be made:

- A failed job (``None``, or a gold record with no prediction at all) is wrong
  everywhere it can be: every scalar row counts it wrong (also where gold is
  null), and every list counts it as having predicted as many items as gold has,
  at least one, none of them right. So it lowers recall and precision, and a
  failure never scores on a field whose gold list is empty. It adds nothing to
  nested rows ("medications.dose"): those measure the sub-fields of items that
  were found, and the failure has already lost every item in the parent row.
- A record whose list is empty both in gold and in the prediction adds nothing
  to the micro counts (there is nothing to get wrong); a prf row whose summed
  counts are all zero scores 1.0 on all three. Precision with nothing predicted,
  or recall with nothing in gold, but the other side non-empty, is 0.0.
- Containment needs the shorter side to be at least ``MIN_CONTAINED_CHARS``
  characters after normalising, so a stray "a" or "1" does not match everything.
  Exact matches are paired first, then containments, most similar lengths
  first, so "asthma" and "moderate acute asthma exacerbation" each pair with
  their own counterpart.
- Free-text scalars (``chief_complaint``, ``follow_up``) are held to exact match
  after normalising too, as asked; expect those rows to be the strictest.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from medq.core.schemas import ExtractionSchema

NUMBER_TOLERANCE = 0.05
MIN_CONTAINED_CHARS = 2

# Closing bracket -> its opener; used so "penicillin (rash)" keeps its ")".
_BRACKETS = {")": "(", "]": "[", "}": "{", "）": "（", "】": "【", "」": "「", "』": "『", "》": "《"}
_OPENERS = {v: k for k, v in _BRACKETS.items()}
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WHITESPACE_RE = re.compile(r"\s+")
# "500 mg" -> "500mg", "36.8 °c" -> "36.8°c": writers space units either way.
_NUMBER_UNIT_RE = re.compile(r"(?<=\d) (?=[^\W\d_]|[°%])")
# Chinese is written without spaces, so any space next to a CJK character is noise.
_CJK_SPACE_RE = re.compile(rf"(?<=[{_CJK}]) | (?=[{_CJK}])")
_EPSILON = 1e-9  # 37.05 - 37.0 is 0.04999... or 0.0500...1 depending on rounding


class ScoreKind(str, Enum):
    """How a row is scored: accuracy of single values, or P/R/F1 over list items."""

    ACCURACY = "accuracy"
    PRF = "prf"


def normalise(value: Any) -> str:
    """Canonical text for matching: NFKC (full-width -> half-width, ℃ -> °C),
    casefolded, whitespace collapsed, surrounding punctuation dropped, no space
    between a number and its unit, no space next to Chinese characters.

    ``None`` is ``""``; numbers and booleans go through ``str``; lists and
    objects through JSON with sorted keys.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bool, int, float)):
        text = str(value)
    else:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _WHITESPACE_RE.sub(" ", text)
    text = _strip_punctuation(text)
    text = _NUMBER_UNIT_RE.sub("", text)
    return _CJK_SPACE_RE.sub("", text)


def _is_edge_junk(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def _strip_punctuation(text: str) -> str:
    start, end = 0, len(text)
    while start < end:
        ch = text[start]
        if not _is_edge_junk(ch) or (ch in _OPENERS and _OPENERS[ch] in text[start + 1 : end]):
            break
        start += 1
    while end > start:
        ch = text[end - 1]
        if not _is_edge_junk(ch) or (ch in _BRACKETS and _BRACKETS[ch] in text[start : end - 1]):
            break
        end -= 1
    return text[start:end]


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(unicodedata.normalize("NFKC", value).strip())
        except ValueError:
            return None
    return None


def values_equal(pred: Any, gold: Any, prop: Mapping[str, Any] | None = None) -> bool:
    """Whether a predicted scalar counts as the gold one (see the module docstring)."""
    if pred is None or gold is None:
        return pred is None and gold is None
    if isinstance(pred, bool) or isinstance(gold, bool):
        return normalise(pred) == normalise(gold)
    if _is_numeric(prop) or (isinstance(pred, (int, float)) and isinstance(gold, (int, float))):
        p, g = _as_number(pred), _as_number(gold)
        if p is not None and g is not None:
            return abs(p - g) <= NUMBER_TOLERANCE + _EPSILON
    return normalise(pred) == normalise(gold)


def match_items(pred: Sequence[Any], gold: Sequence[Any]) -> list[tuple[int, int]]:
    """One-to-one greedy pairing of predicted and gold items, as (pred index, gold index).

    Exact matches after ``normalise`` are paired first; then pairs where one
    contains the other, the closest in length first.
    """
    p_text = [normalise(v) for v in pred]
    g_text = [normalise(v) for v in gold]
    pairs: list[tuple[int, int]] = []
    p_free, g_free = set(range(len(pred))), set(range(len(gold)))
    for gi, g in enumerate(g_text):
        for pi in sorted(p_free):
            if p_text[pi] == g:
                pairs.append((pi, gi))
                p_free.discard(pi)
                g_free.discard(gi)
                break
    candidates: list[tuple[float, int, int]] = []
    for gi in g_free:
        for pi in p_free:
            p, g = p_text[pi], g_text[gi]
            short, long_ = sorted((p, g), key=len)
            if len(short) >= MIN_CONTAINED_CHARS and short in long_:
                candidates.append((-len(short) / len(long_), gi, pi))
    for _, gi, pi in sorted(candidates):
        if gi in g_free and pi in p_free:
            pairs.append((pi, gi))
            p_free.discard(pi)
            g_free.discard(gi)
    return sorted(pairs, key=lambda pair: pair[1])


def prf(true_positives: int, predicted: int, gold: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from counts; all 1.0 when nothing was expected or predicted."""
    if predicted == 0 and gold == 0:
        return 1.0, 1.0, 1.0
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


@dataclass(frozen=True)
class FieldScore:
    """One row of a report. ``n`` counts compared values for accuracy rows and
    scored records for prf rows; the raw counts are kept so reports can be merged."""

    field: str
    kind: ScoreKind
    n: int
    accuracy: float | None = None
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    correct: int = 0
    true_positives: int = 0
    predicted: int = 0
    gold: int = 0

    @property
    def score(self) -> float | None:
        """The row's contribution to ``Report.macro``: accuracy, or F1 for prf rows."""
        return self.accuracy if self.kind is ScoreKind.ACCURACY else self.f1

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form; accuracy rows carry no P/R/F1 keys and prf rows no accuracy."""
        row: dict[str, Any] = {"field": self.field, "kind": self.kind.value, "n": self.n}
        if self.kind is ScoreKind.ACCURACY:
            row.update(accuracy=self.accuracy, correct=self.correct)
        else:
            row.update(
                precision=self.precision,
                recall=self.recall,
                f1=self.f1,
                true_positives=self.true_positives,
                predicted=self.predicted,
                gold=self.gold,
            )
        return row


@dataclass(frozen=True)
class Report:
    """Per-field scores of one batch against its gold labels.

    ``records`` is the number of gold records scored; ``succeeded`` of them had
    data, ``failed`` had a prediction of ``None`` and ``missing`` had none at
    all (scored as failed). ``unmatched_predictions`` are ids with no gold label,
    which are ignored.
    """

    schema: str
    schema_version: int
    rows: tuple[FieldScore, ...]
    macro: float | None
    records: int
    succeeded: int
    failed: int
    missing: int
    unmatched_predictions: int
    averaging: str = "micro"

    def row(self, name: str) -> FieldScore:
        """The row for a field path such as ``"medications.dose"``."""
        for r in self.rows:
            if r.field == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {', '.join(r.field for r in self.rows)}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form, for ``--json``."""
        return {
            "schema": self.schema,
            "schema_version": self.schema_version,
            "averaging": self.averaging,
            "macro": self.macro,
            "records": self.records,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "missing": self.missing,
            "unmatched_predictions": self.unmatched_predictions,
            "rows": [r.as_dict() for r in self.rows],
        }


@dataclass
class _Tally:
    kind: ScoreKind
    n: int = 0
    correct: int = 0
    true_positives: int = 0
    predicted: int = 0
    gold: int = 0

    def to_row(self, name: str) -> FieldScore:
        if self.kind is ScoreKind.ACCURACY:
            accuracy = self.correct / self.n if self.n else None
            return FieldScore(name, self.kind, self.n, accuracy=accuracy, correct=self.correct)
        precision = recall = f1 = None
        if self.n:
            precision, recall, f1 = prf(self.true_positives, self.predicted, self.gold)
        return FieldScore(
            name,
            self.kind,
            self.n,
            precision=precision,
            recall=recall,
            f1=f1,
            true_positives=self.true_positives,
            predicted=self.predicted,
            gold=self.gold,
        )


@dataclass
class _Scorer:
    tallies: dict[str, _Tally] = field(default_factory=dict)

    def layout(self, path: str, prop: Mapping[str, Any]) -> None:
        # Rows are created from the schema up front so every field gets a row,
        # in schema order, even when no record exercises it.
        kind = _kind(prop)
        if kind == "object":
            for sub, sub_prop in prop["properties"].items():
                self.layout(f"{path}.{sub}", sub_prop)
        elif kind == "array":
            self.tallies[path] = _Tally(ScoreKind.PRF)
            items = prop.get("items") or {}
            if _kind(items) == "object":
                key = item_key(items)
                for sub, sub_prop in items["properties"].items():
                    if sub != key:
                        self.layout(f"{path}.{sub}", sub_prop)
        else:
            self.tallies[path] = _Tally(ScoreKind.ACCURACY)

    def score(self, path: str, prop: Mapping[str, Any], pred: Any, gold: Any, failed: bool) -> None:
        kind = _kind(prop)
        if kind == "object":
            for sub, sub_prop in prop["properties"].items():
                self.score(f"{path}.{sub}", sub_prop, _get(pred, sub), _get(gold, sub), failed)
        elif kind == "array":
            self._score_list(path, prop, pred, gold, failed)
        else:
            tally = self.tallies[path]
            tally.n += 1
            tally.correct += int(not failed and values_equal(pred, gold, prop))

    def _score_list(self, path: str, prop: Mapping[str, Any], pred: Any, gold: Any, failed: bool) -> None:
        tally = self.tallies[path]
        gold_items = list(gold or [])
        tally.n += 1
        tally.gold += len(gold_items)
        if failed:
            tally.predicted += max(len(gold_items), 1)
            return
        pred_items = list(pred) if isinstance(pred, (list, tuple)) else []
        tally.predicted += len(pred_items)
        items = prop.get("items") or {}
        if _kind(items) != "object":
            tally.true_positives += len(match_items(pred_items, gold_items))
            return
        key = item_key(items)
        pairs = match_items([_get(i, key) for i in pred_items], [_get(i, key) for i in gold_items])
        tally.true_positives += len(pairs)
        for pi, gi in pairs:
            for sub, sub_prop in items["properties"].items():
                if sub != key:
                    self.score(f"{path}.{sub}", sub_prop, _get(pred_items[pi], sub), _get(gold_items[gi], sub), False)


def _types(prop: Mapping[str, Any]) -> list[Any]:
    t = prop.get("type")
    return list(t) if isinstance(t, list) else [t]


def _kind(prop: Mapping[str, Any]) -> str:
    types = _types(prop)
    if "array" in types:
        return "array"
    if "object" in types and isinstance(prop.get("properties"), Mapping):
        return "object"
    return "scalar"


def _is_numeric(prop: Mapping[str, Any] | None) -> bool:
    return prop is not None and any(t in ("number", "integer") for t in _types(prop))


def item_key(items: Mapping[str, Any]) -> str | None:
    """The property that identifies a list item: the first required string one."""
    props: Mapping[str, Any] = items.get("properties") or {}
    ordered = [*items.get("required", []), *props]
    for name in ordered:
        if name in props and "string" in _types(props[name]):
            return str(name)
    return None


def _get(obj: Any, key: str | None) -> Any:
    if key is None:
        return obj  # no key property: the whole item is matched on its JSON text
    return obj.get(key) if isinstance(obj, Mapping) else None


def evaluate(
    schema: ExtractionSchema,
    preds: Mapping[str, Mapping[str, Any] | None],
    golds: Mapping[str, Mapping[str, Any]],
) -> Report:
    """Score predictions (record id -> extracted ``data``, ``None`` for a failed
    job) against gold labels (record id -> ``data``) for ``schema``.

    Every gold record is scored; one without a prediction counts as failed.
    """
    scorer = _Scorer()
    for name in schema.field_names:
        scorer.layout(name, schema.fields[name])
    succeeded = failed = missing = 0
    for record_id, gold in golds.items():
        if not isinstance(gold, Mapping):
            raise ValueError(f"gold label for record {record_id!r} is not an object")
        if record_id not in preds:
            missing += 1
        pred = preds.get(record_id)
        is_failed = not isinstance(pred, Mapping)
        if is_failed and record_id in preds:
            failed += 1
        elif not is_failed:
            succeeded += 1
        for name in schema.field_names:
            scorer.score(name, schema.fields[name], _get(pred, name), gold.get(name), is_failed)
    rows = tuple(t.to_row(name) for name, t in scorer.tallies.items())
    scores = [r.score for r in rows if r.score is not None]
    return Report(
        schema=schema.name,
        schema_version=schema.version,
        rows=rows,
        macro=sum(scores) / len(scores) if scores else None,
        records=len(golds),
        succeeded=succeeded,
        failed=failed,
        missing=missing,
        unmatched_predictions=sum(1 for record_id in preds if record_id not in golds),
    )


def records_by_id(lines: Iterable[str]) -> dict[str, dict[str, Any] | None]:
    """``{"id", "data"}`` JSONL lines (a gold file, or ``medq results`` output) as
    id -> data. Blank lines are skipped; a bad line raises ``ValueError`` naming
    its line number."""
    out: dict[str, dict[str, Any] | None] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
            raise ValueError(f"line {number}: expected an object with a string 'id'")
        data = obj.get("data")
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"line {number}: 'data' of record {obj['id']!r} must be an object or null")
        if obj["id"] in out:
            raise ValueError(f"line {number}: duplicate record id {obj['id']!r}")
        out[obj["id"]] = data
    return out
