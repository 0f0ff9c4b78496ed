"""Input records: reading JSONL, CSV, a folder of .txt files or stdin, and checking them.

Every problem is reported with where it is (file and line, or file name) and the
record id, never with the record's text. Nothing is enqueued from a file that
has problems unless the caller asks to skip the bad records.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

DEFAULT_MAX_RECORD_BYTES = 200_000
DEFAULT_MAX_ID_CHARS = 256
DEFAULT_MAX_METADATA_BYTES = 64 * 1024


def limits_of(settings: Any) -> dict[str, int]:
    """The record limits of ``medq.core.settings.Settings``, as keyword arguments of ``check``
    and ``RecordChecker``."""
    return {
        "max_record_bytes": settings.max_record_bytes,
        "max_id_chars": settings.max_id_chars,
        "max_metadata_bytes": settings.max_metadata_bytes,
    }


class Record(BaseModel):
    id: str = Field(min_length=1)
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class RecordProblem:
    where: str  # "notes.jsonl:12", "notes/abc.txt", "record 3"
    message: str
    record_id: str | None = None
    field: str | None = None  # the record field at fault: "id", "text", "metadata"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class CheckedRecords:
    records: list[Record] = field(default_factory=list)
    problems: list[RecordProblem] = field(default_factory=list)


# A raw item is (where, dict) or (where, RecordProblem) when it could not even be parsed.
RawItem = tuple[str, "dict[str, Any] | RecordProblem"]


def read_path(path: str | Path, fmt: str | None = None) -> Iterator[RawItem]:
    """Raw records from a JSONL or CSV file, a folder of ``*.txt``, or ``-`` for stdin (JSONL)."""
    if str(path) == "-":
        yield from _read_jsonl(sys.stdin.buffer, "<stdin>")
        return
    p = Path(path)
    if p.is_dir():
        yield from _read_folder(p)
        return
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file or folder")
    kind = fmt or ("csv" if p.suffix.lower() == ".csv" else "jsonl")
    with p.open("rb") as fh:
        if kind == "csv":
            yield from _read_csv(fh.read(), p.name)
        else:
            yield from _read_jsonl(fh, p.name)


def _read_jsonl(fh: Any, name: str) -> Iterator[RawItem]:
    for line_no, raw in enumerate(fh, start=1):
        item = parse_jsonl_line(raw, f"{name}:{line_no}")
        if item is not None:
            yield item


def parse_jsonl_line(raw: bytes, where: str) -> RawItem | None:
    """One JSONL line as a raw record (or the problem with it); None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return where, RecordProblem(where, f"not valid UTF-8 (byte {exc.start} of the line)")
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:  # a 5,000-digit number, or nesting too deep, is not JSONDecodeError
        return where, RecordProblem(where, f"not valid JSON ({json_error_text(exc)})")
    return where, object_or_problem(obj, where)


def json_error_text(exc: BaseException, of: str = "") -> str:
    """Why ``json`` refused a text: its message and column (``of``: "the body" adds the line)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno} of {of}" if of else f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return "a number too long to read"


def object_or_problem(obj: Any, where: str) -> dict[str, Any] | RecordProblem:
    if isinstance(obj, dict):
        return obj
    return RecordProblem(where, 'expected a JSON object like {"id": ..., "text": ...}')


def _read_csv(data: bytes, name: str) -> Iterator[RawItem]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = data.count(b"\n", 0, exc.start) + 1
        yield f"{name}:{line_no}", RecordProblem(f"{name}:{line_no}", "not valid UTF-8; the CSV cannot be read past it")
        return
    # strict: a quote that does not close where a field ends is an error, not text. Without
    # it one stray quote swallows every later row into one record's text (patients merged).
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    row_start = 1
    try:
        fields = reader.fieldnames or []
        if "id" not in fields or "text" not in fields:
            yield f"{name}:1", RecordProblem(f"{name}:1", f"CSV header must have columns id and text, found {fields}")
            return
        row_start = reader.line_num + 1
        for row in reader:
            where = f"{name}:{row_start}"
            row_start, first_line = reader.line_num + 1, row_start
            yield where, _csv_record(row, where, first_line)
    except csv.Error as exc:
        where = f"{name}:{row_start}"
        yield where, RecordProblem(
            where, f"a quoted field that starts on line {row_start} is not closed where it should be ({exc}); the CSV "
            'cannot be read past it. Close the quote, or double every " inside a quoted field ("")',
        )


# A line that begins like a CSV row: a short first field without quotes, then a comma.
_ROW_START = re.compile(r'(?:\r\n|\n|\r)[^\s,"][^,"\r\n]{0,127},')


def _csv_record(row: dict[str | None, Any], where: str, first_line: int) -> dict[str, Any] | RecordProblem:
    if None in row:
        return RecordProblem(where, "more values than header columns")
    if None in row.values():  # what a quote out of place leaves too: a row cut in two
        return RecordProblem(where, "fewer values than header columns")
    for column, value in row.items():
        if isinstance(value, str) and _reads_as_merged_rows(value):
            return RecordProblem(
                where, f'column {column!r} of the row starting on line {first_line} spans several lines, holds a " '
                "and then a line that reads as the start of another row: a quote is probably not closed. Check the "
                'quotes of that row (inside a quoted field every " is written ""), or send such notes as JSONL',
                field="text" if column == "text" else "metadata",
            )
    rec = {"id": row.pop("id"), "text": row.pop("text"), "metadata": {k: v for k, v in row.items() if k}}
    return rec


def _reads_as_merged_rows(value: str) -> bool:
    """A field that, after a quote character, has a line starting like a row (``12,...``): what
    an unclosed quote does when the quotes of later rows happen to pair up (strict parsing
    catches the rest)."""
    quote = value.find('"')
    return quote >= 0 and _ROW_START.search(value, quote) is not None


def _read_folder(folder: Path) -> Iterator[RawItem]:
    files = sorted(folder.glob("*.txt"))
    if not files:
        yield str(folder), RecordProblem(str(folder), "no *.txt files in this folder")
    for f in files:
        where = f"{folder.name}/{f.name}"
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            line_no = f.read_bytes().count(b"\n", 0, exc.start) + 1
            yield where, RecordProblem(where, f"not valid UTF-8 (line {line_no})", f.stem)
            continue
        yield where, {"id": f.stem, "text": text}


def from_objects(items: Iterable[Any]) -> Iterator[RawItem]:
    """Raw records from Python objects: dicts or ``Record``s."""
    for i, item in enumerate(items, start=1):
        where = f"record {i}"
        if isinstance(item, Record):
            yield where, item.model_dump()
        elif isinstance(item, dict):
            yield where, item
        else:
            yield where, RecordProblem(where, f"expected a dict with id and text, got {type(item).__name__}")


def check(
    items: Iterable[RawItem], max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, *,
    max_id_chars: int = DEFAULT_MAX_ID_CHARS, max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
) -> CheckedRecords:
    """Validate raw records: id present, unique and not too long, text non-empty and within
    the size limit, metadata a JSON object of finite numbers within its size limit."""
    out = CheckedRecords()
    checker = RecordChecker(max_record_bytes, max_id_chars=max_id_chars, max_metadata_bytes=max_metadata_bytes)
    for where, item in items:
        checked = checker.check(where, item)
        if isinstance(checked, RecordProblem):
            out.problems.append(checked)
        else:
            out.records.append(checked)
    return out


class RecordChecker:
    """Checks raw records one at a time, ids unique among all it has seen: for input
    that arrives as a stream and is not kept (``medq api``'s batch uploads)."""

    def __init__(
        self, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, *,
        max_id_chars: int = DEFAULT_MAX_ID_CHARS, max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
    ) -> None:
        self.max_record_bytes = max_record_bytes
        self.max_id_chars = max_id_chars
        self.max_metadata_bytes = max_metadata_bytes
        self._first_seen: dict[str, str] = {}

    def check(self, where: str, item: dict[str, Any] | RecordProblem) -> Record | RecordProblem:
        if isinstance(item, RecordProblem):
            return item
        problem = _check_one(where, item, self.max_record_bytes, self.max_id_chars) or self._metadata_size(where, item)
        if problem is not None:
            return problem
        rid = _id_of(item)
        assert rid is not None
        if rid in self._first_seen:
            return RecordProblem(where, f"duplicate id {rid!r} (first at {self._first_seen[rid]})", rid, "id")
        self._first_seen[rid] = where
        metadata = item.get("metadata") or {}
        return Record(id=rid, text=item["text"], metadata=metadata if isinstance(metadata, dict) else {})

    def _metadata_size(self, where: str, item: dict[str, Any]) -> RecordProblem | None:
        rid = _id_of(item)
        meta = item.get("metadata")
        if meta:
            size = len(json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
            if size > self.max_metadata_bytes:
                return RecordProblem(
                    where, f'record {rid!r}: "metadata" is {size} bytes of JSON, over the limit of '
                    f"{self.max_metadata_bytes} (MEDQ_MAX_METADATA_BYTES)", rid, "metadata",
                )
        return None


def _id_of(item: dict[str, Any]) -> str | None:
    rid = item.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return None
    rid = str(rid).strip()
    return rid or None


def _check_one(
    where: str, item: dict[str, Any], max_record_bytes: int, max_id_chars: int = DEFAULT_MAX_ID_CHARS,
) -> RecordProblem | None:
    rid = _id_of(item)
    if rid is None:
        return RecordProblem(where, 'missing "id" (a non-empty string or integer)', None, "id")
    if len(rid) > max_id_chars:  # not named: the id itself is what is too long
        return RecordProblem(
            where, f'"id" is {len(rid)} characters, over the limit of {max_id_chars} (MEDQ_MAX_ID_CHARS)', None, "id",
        )
    try:
        rid.encode("utf-8")
    except UnicodeEncodeError:
        return RecordProblem(where, '"id" is not valid UTF-8 (lone surrogate)', None, "id")
    text = item.get("text")
    if not isinstance(text, str):
        return RecordProblem(where, f'record {rid!r}: missing "text" (a string)', rid, "text")
    if not text.strip():
        return RecordProblem(where, f"record {rid!r}: text is empty", rid, "text")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates, e.g. from JSON "\\udc80"
        return RecordProblem(where, f"record {rid!r}: text is not valid UTF-8 (lone surrogate)", rid, "text")
    if size > max_record_bytes:
        return RecordProblem(
            where, f"record {rid!r}: text is {size} bytes, over the limit of {max_record_bytes} (MEDQ_MAX_RECORD_BYTES)",
            rid, "text",
        )
    meta = item.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return RecordProblem(where, f'record {rid!r}: "metadata" must be an object', rid, "metadata")
    return _check_metadata(where, rid, meta) if meta else None


def _check_metadata(where: str, rid: str, meta: dict[str, Any]) -> RecordProblem | None:
    # NaN and Infinity: Python's json reads and writes them, but they are not JSON. PostgreSQL's
    # jsonb refuses them (the job would stick, then fail) and strict parsers refuse the export.
    path = _non_finite_number(meta)
    if path is not None:
        return RecordProblem(
            where, f'record {rid!r}: "metadata" field {path} is not a finite number (NaN or Infinity are not JSON); '
            "use null or a string", rid, "metadata",
        )
    try:  # only metadata can still hold a lone surrogate; most records have none
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return RecordProblem(where, f'record {rid!r}: "metadata" holds text that is not valid UTF-8', rid, "metadata")
    except (TypeError, ValueError, RecursionError):  # a Python object JSON cannot hold, or nested too deeply
        return RecordProblem(where, f'record {rid!r}: "metadata" is not JSON (only objects, lists, strings, '
                             "finite numbers, true, false and null)", rid, "metadata")
    return None


def _non_finite_number(meta: dict[str, Any]) -> str | None:
    """The path (``ward.scores[2]``) of the first NaN or infinite float in ``meta``, or None.
    Walked without recursion: metadata from Python may be nested deeper than the stack."""
    stack: list[tuple[str, Any]] = [(_key_path("", k), v) for k, v in reversed(meta.items())]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path
        if isinstance(value, dict):
            stack += [(_key_path(path, k), v) for k, v in reversed(value.items())]
        elif isinstance(value, (list, tuple)):
            stack += [(f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value)))]
    return None


def _key_path(parent: str, key: Any) -> str:
    name = str(key)
    part = name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,63}", name) else json.dumps(name[:64], ensure_ascii=False)
    return f"{parent}.{part}" if parent else part
