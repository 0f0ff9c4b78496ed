"""``medq review``: one self-contained HTML page to check a batch by eye.

Each note is shown with the evidence of every extracted value highlighted (a ``<mark>``
whose ``data-path`` names the value: ``medications[0].dose``), the extraction beside it,
values without evidence marked (class ``ungrounded``) and, with gold labels, each value
right or wrong (the matching of ``medq eval``: ``medq.tools.evaluate``).

Where the notes come from. A result holds no note text, and a job's stored record is
deleted when it succeeds, so the page takes the notes from:

1. the record still stored in Redis (a job that failed or has not finished): the very text
   the worker read;
2. ``--notes FILE``: the JSONL, CSV or folder the batch was enqueued from, read as
   ``medq enqueue`` reads it and matched by record id. A record whose text or metadata
   differs from the one enqueued (the job keeps a digest of it) is shown without
   highlights: its offsets would point at the wrong words.

A record with neither is listed with its extraction and a line saying why.

The page holds PHI (the notes): it is written only where the caller says, with mode 0600,
and it asks for nothing over the network (no CDN, no fonts, no scripts; a Content Security
Policy of ``default-src 'none'`` keeps it so even if a note holds a link), so it opens in a
hospital without internet access.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import redis

from medq.core.crypto import EncryptionKeyError, Sealer, open_text
from medq.state.jobs import stored_records
from medq.tools.evaluate import item_key, match_items, values_equal
from producer.enqueue import record_digest
from producer.records import Record, check, read_path


@dataclass(frozen=True)
class Note:
    """A record's text, or why there is none (``text`` None) or why it is shown plain."""

    text: str | None
    source: str = ""  # "stored record", "notes file"
    problem: str = ""  # why there is no text, or why its highlights are not shown


@dataclass
class Row:
    """One extracted value: where it is, what it is, its evidence, and how it scored."""

    path: str
    value: Any
    spans: list[tuple[int, int]] = field(default_factory=list)
    ungrounded: bool = False
    right: bool | None = None  # None: no gold label to compare with
    gold: Any = None  # the gold value it was compared with, shown when wrong


# ---------------------------------------------------------------- where the notes come from


def read_notes(path: Path, limits: Mapping[str, int]) -> tuple[dict[str, Record], int]:
    """The records of a notes file (as ``medq enqueue`` reads it), by id, and how many
    could not be read (they are left out: such a record was never enqueued)."""
    checked = check(read_path(path), **limits)
    return {rec.id: rec for rec in checked.records}, len(checked.problems)


def find_notes(
    r: redis.Redis, docs: list[dict[str, Any]], records: Mapping[str, Record], sealer: Sealer | None,
) -> dict[str, Note]:
    """Each job's note (by job id): its stored record first, else the notes file's."""
    stored = stored_records(r, [doc["job_id"] for doc in docs])
    return {doc["job_id"]: _note_of(doc, raw, digest, records, sealer)
            for doc, (raw, digest) in zip(docs, stored, strict=True)}


def _note_of(doc: dict[str, Any], raw: bytes | None, digest: bytes | None,
             records: Mapping[str, Record], sealer: Sealer | None) -> Note:
    if raw is not None:
        try:
            return Note(json.loads(open_text(raw.decode("utf-8"), sealer, "the stored record"))["text"], "stored record")
        except EncryptionKeyError as exc:
            stored_problem = f"its stored record cannot be read ({exc.message})"
    else:
        stored_problem = "its stored record is gone (deleted when the job succeeded)"
    rec = records.get(doc["id"])
    if rec is None:
        hint = "; pass the file it was enqueued from with --notes" if not records else " and it is not in the --notes file"
        return Note(None, problem=stored_problem + hint)
    if digest is not None and digest.decode() != record_digest(rec):
        return Note(rec.text, "notes file", "this note differs from the one that was extracted (text or metadata "
                    "changed since it was enqueued): its evidence is not highlighted")
    return Note(rec.text, "notes file")


# ---------------------------------------------------------------- the rows of one extraction


def rows_of(doc: dict[str, Any], gold: Mapping[str, Any] | None, json_schema: Mapping[str, Any]) -> tuple[list[Row], list[tuple[str, Any]]]:
    """The values of a result as rows, in order, and (with gold) the gold values it missed."""
    data = doc.get("data")
    if not isinstance(data, dict):
        return [], []
    evidence = doc.get("evidence") or {}
    ungrounded = set((doc.get("provenance") or {}).get("ungrounded_fields") or [])
    rows = [Row(path, value, [(int(a), int(b)) for a, b in evidence.get(path, [])], path in ungrounded)
            for path, value in _leaves(data, "")]
    missed: list[tuple[str, Any]] = []
    if gold is not None:
        verdicts: dict[str, tuple[bool, Any]] = {}
        _judge(data, gold, dict(json_schema), "", verdicts, missed)
        for row in rows:
            row.right, row.gold = verdicts.get(row.path, (None, None))
    return rows, missed


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of every scalar, nulls and empty lists included, in document order."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def _judge(pred: Any, gold: Any, prop: dict[str, Any], path: str,
           verdicts: dict[str, tuple[bool, Any]], missed: list[tuple[str, Any]]) -> None:
    """Right or wrong for every leaf of ``pred``, by ``medq eval``'s rules: scalars by
    ``values_equal``, list items paired by ``match_items`` (objects on their key)."""
    if isinstance(pred, dict):
        props = prop.get("properties") or {}
        gold_obj = gold if isinstance(gold, dict) else {}
        for k, v in pred.items():
            _judge(v, gold_obj.get(k), props.get(k) or {}, f"{path}.{k}" if path else k, verdicts, missed)
    elif isinstance(pred, list):
        _judge_list(pred, gold if isinstance(gold, list) else [], prop.get("items") or {}, path, verdicts, missed)
    else:
        verdicts[path] = values_equal(pred, gold, prop), gold


def _judge_list(pred: list[Any], gold: list[Any], items: dict[str, Any], path: str,
                verdicts: dict[str, tuple[bool, Any]], missed: list[tuple[str, Any]]) -> None:
    if not pred:
        verdicts[path] = not gold, gold  # the empty list is its own row
    objects = any(isinstance(i, dict) for i in (*pred, *gold))
    key = ((item_key(items) if items.get("properties") else None) or _guess_key(pred, gold)) if objects else None
    pick = (lambda item: item.get(key) if isinstance(item, dict) else None) if key else (lambda item: item)
    pairs = dict(match_items([pick(i) for i in pred], [pick(i) for i in gold]))
    for pi, item in enumerate(pred):
        item_path = f"{path}[{pi}]"
        if pi not in pairs:
            for leaf, _ in _leaves(item, item_path):
                verdicts[leaf] = False, None  # an item gold does not have
        elif isinstance(item, dict) and key:
            verdicts[f"{item_path}.{key}"] = True, gold[pairs[pi]].get(key)
            _judge({k: v for k, v in item.items() if k != key}, gold[pairs[pi]], items, item_path, verdicts, missed)
        else:
            _judge(item, gold[pairs[pi]], items, item_path, verdicts, missed)
    matched = set(pairs.values())
    missed.extend((path, g) for gi, g in enumerate(gold) if gi not in matched)


def _guess_key(pred: list[Any], gold: list[Any]) -> str | None:
    # no schema at hand: the first string property, as item_key takes it from a schema
    for item in (*pred, *gold):
        if isinstance(item, dict):
            return next((k for k, v in item.items() if isinstance(v, str)), None)
    return None


# ---------------------------------------------------------------- HTML


def highlighted(note: str, rows: Iterable[Row], anchor: str) -> tuple[str, dict[str, str]]:
    """The note as escaped HTML with each row's spans in a ``<mark>``, and the id of each
    path's first mark. Overlapping spans are cut where any span starts or ends, so the
    text appears once, in order; a piece inside several spans names them all in
    ``data-path``, space-separated (select one with ``mark[data-path~="age"]``)."""
    cover: list[tuple[int, int, str]] = [(a, b, row.path) for row in rows for a, b in row.spans
                                         if 0 <= a < b <= len(note)]
    cuts = sorted({0, len(note), *(a for a, _, _ in cover), *(b for _, b, _ in cover)})
    parts: list[str] = []
    first: dict[str, str] = {}
    for n, (start, end) in enumerate(pairwise(cuts)):
        text = html.escape(note[start:end])
        paths = [p for a, b, p in cover if a <= start and end <= b]
        if not paths:
            parts.append(text)
            continue
        mark_id = f"{anchor}-m{n}"
        for p in paths:
            first.setdefault(p, mark_id)
        names = " ".join(dict.fromkeys(paths))
        cls = ' class="overlap"' if len(set(paths)) > 1 else ""
        parts.append(f'<mark id="{mark_id}"{cls} data-path="{html.escape(names)}" '
                     f'title="{html.escape(", ".join(dict.fromkeys(paths)))}">{text}</mark>')
    return "".join(parts), first


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _verdict(row: Row) -> str:
    if row.right is None:
        return ""
    if row.right:
        return "right"
    return f"wrong (gold: {html.escape(_value_text(row.gold))})" if row.gold is not None else "wrong"


def _table(rows: list[Row], missed: list[tuple[str, Any]], first: dict[str, str], graded: bool) -> str:
    head = "<tr><th>field</th><th>value</th><th>evidence</th>" + ("<th>gold</th>" if graded else "") + "</tr>"
    body = []
    for row in rows:
        classes = [c for c, on in (("ungrounded", row.ungrounded), ("right", row.right is True),
                                   ("wrong", row.right is False)) if on]
        n = len(row.spans)
        if row.ungrounded:
            ev = "<span class=\"flag\">no evidence</span>"
        elif n and row.path in first:
            ev = f'<a href="#{first[row.path]}">{n} span{"s" if n > 1 else ""}</a>'
        else:
            ev = f"{n} span{'s' if n != 1 else ''}" if n else "&ndash;"
        verdict = "" if not graded else f"<td>{_verdict(row)}</td>"
        body.append(f'<tr class="{" ".join(classes)}" data-path="{html.escape(row.path)}" data-evidence="{n}">'
                    f"<td><code>{html.escape(row.path)}</code></td><td>{html.escape(_value_text(row.value))}</td>"
                    f"<td>{ev}</td>{verdict}</tr>")
    for path, value in missed:
        body.append(f'<tr class="missed" data-path="{html.escape(path)}"><td><code>{html.escape(path)}</code></td>'
                    f"<td>{html.escape(_value_text(value))}</td><td>&ndash;</td><td>missed (in gold only)</td></tr>")
    return f'<table class="extraction">{head}{"".join(body)}</table>'


def record_html(index: int, doc: dict[str, Any], note: Note, rows: list[Row], missed: list[tuple[str, Any]],
                graded: bool) -> str:
    """One record's section: header, the note with its marks, the extraction table."""
    anchor = f"r{index}"
    lines = [f"status: {doc.get('status')}"]
    if doc.get("error"):
        lines.append(f"error: {doc['error'].get('kind')}: {doc['error'].get('message')}")
    if doc.get("model"):
        lines.append(f"model: {doc['model']}")
    if note.source:
        lines.append(f"note from the {note.source}")
    if note.text is None:
        note_html = f'<p class="no-note">No note shown: {html.escape(note.problem)}.</p>'
        first: dict[str, str] = {}
    elif note.problem:
        note_html = f'<p class="no-note">{html.escape(note.problem)}.</p><pre class="note">{html.escape(note.text)}</pre>'
        first = {}
    else:
        marked, first = highlighted(note.text, rows, anchor)
        note_html = f'<pre class="note">{marked}</pre>'
    table = _table(rows, missed, first, graded) if rows or missed else '<p class="no-data">No extraction.</p>'
    meta = " &middot; ".join(html.escape(x) for x in lines)
    return (f'<section class="record" id="{anchor}" data-record="{html.escape(doc["id"])}">'
            f'<h2>{html.escape(doc["id"])}</h2><p class="meta">{meta}</p>'
            f'<div class="pair"><div>{note_html}</div><div>{table}</div></div></section>')


_CSS = """
body{font:14px/1.45 system-ui,"Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;margin:1.5em;color:#222}
.phi{background:#fff3cd;border:1px solid #e0c36a;padding:.5em 1em}
.record{border-top:2px solid #ccc;margin-top:1.5em}
.pair{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1.5em}
pre.note{white-space:pre-wrap;word-wrap:break-word;background:#fafafa;padding:1em;border:1px solid #ddd;
 font:14px/1.6 ui-monospace,monospace,"Noto Sans Mono CJK SC","Noto Sans CJK SC"}
mark{background:#ffe066;padding:0}
mark.overlap{background:#ffb347}
mark:target{outline:2px solid #d9480f}
table.extraction{border-collapse:collapse;width:100%}
table.extraction td,table.extraction th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
tr.ungrounded td{background:#ffe3e3}
.flag{color:#c92a2a;font-weight:bold}
tr.right td:last-child{color:#2b8a3e;font-weight:bold}
tr.wrong td:last-child{color:#c92a2a;font-weight:bold}
tr.missed td{background:#f1f3f5;color:#666}
.meta,.no-note,.no-data{color:#555}
"""

# The page may open nothing: no scripts, no fonts, no images, no requests of any kind.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def page(batch: str, sections: list[str], summary: str) -> str:
    """The whole page: inline CSS only, nothing fetched."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>medq review: {html.escape(batch)}</title><style>{_CSS}</style></head><body>"
        f"<h1>medq review: batch {html.escape(batch)}</h1>"
        '<p class="phi">This page shows patient notes (PHI). Keep it where the notes may be kept, '
        "and delete it when the review is done.</p>"
        f"<p>{summary}</p>"
        "<p>Highlighted: the text each value was found in (hover for the field). "
        '<span class="flag">no evidence</span>: a value that does not occur in the note.</p>'
        + "".join(sections) + "</body></html>\n"
    )


def build(batch: str, docs: list[dict[str, Any]], notes: Mapping[str, Note],
          golds: Mapping[str, Mapping[str, Any] | None] | None = None,
          schemas: Mapping[tuple[str, int], Mapping[str, Any]] | None = None) -> str:
    """The page for ``docs`` (``medq results`` documents), ``notes`` by job id, ``golds``
    by record id (``{"id", "data"}`` of a gold file), ``schemas`` (name, version) -> JSON
    Schema, used to match list items on their key as ``medq eval`` does."""
    sections = []
    ungrounded = right = wrong = no_note = 0
    for i, doc in enumerate(docs):
        gold = golds.get(doc["id"]) if golds is not None else None
        json_schema = (schemas or {}).get((str(doc.get("schema")), int(doc.get("schema_version") or 0)), {})
        rows, missed = rows_of(doc, gold, json_schema)
        note = notes.get(doc["job_id"], Note(None, problem="no note was found"))
        sections.append(record_html(i, doc, note, rows, missed, golds is not None))
        ungrounded += sum(row.ungrounded for row in rows)
        right += sum(row.right is True for row in rows)
        wrong += sum(row.right is False for row in rows)
        no_note += note.text is None
    summary = f"{len(docs)} record(s), {ungrounded} value(s) without evidence"
    if golds is not None:
        summary += f", {right} right and {wrong} wrong against the gold labels"
    if no_note:
        summary += f"; {no_note} record(s) shown without their note (each says why)"
    return page(batch, sections, html.escape(summary))


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), whole or not at all:
    a temporary file beside it (created 0600) replaces it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or Path("."), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
