"""Input records: reading JSONL, CSV, a folder of .txt files or stdin, and checking them.

Every problem is reported with where it is (file and line, or file name) and the
record id, never with the record's text. Nothing is enqueued from a file that
has problems unless the caller asks to skip the bad records.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

DEFAULT_MAX_RECORD_BYTES = 200_000


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


class InputError(ValueError):
    """The input has problems; ``problems`` says which, with line numbers."""

    def __init__(self, problems: list[RecordProblem]) -> None:
        self.problems = problems
        head = "; ".join(str(p) for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} invalid record(s): {head}{more}")


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
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = reader.fieldnames or []
    if "id" not in fields or "text" not in fields:
        yield f"{name}:1", RecordProblem(f"{name}:1", f"CSV header must have columns id and text, found {fields}")
        return
    row_start = 2
    for row in reader:
        where = f"{name}:{row_start}"
        row_start = reader.line_num + 1
        if None in row:
            yield where, RecordProblem(where, "more values than header columns")
            continue
        rec = {"id": row.pop("id"), "text": row.pop("text"), "metadata": {k: v for k, v in row.items() if k}}
        yield where, rec


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


def check(items: Iterable[RawItem], max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> CheckedRecords:
    """Validate raw records: id present and unique, text non-empty, within the size limit."""
    out = CheckedRecords()
    checker = RecordChecker(max_record_bytes)
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

    def __init__(self, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.max_record_bytes = max_record_bytes
        self._first_seen: dict[str, str] = {}

    def check(self, where: str, item: dict[str, Any] | RecordProblem) -> Record | RecordProblem:
        if isinstance(item, RecordProblem):
            return item
        problem = _check_one(where, item, self.max_record_bytes)
        if problem is not None:
            return problem
        rid = _id_of(item)
        assert rid is not None
        if rid in self._first_seen:
            return RecordProblem(where, f"duplicate id {rid!r} (first at {self._first_seen[rid]})", rid, "id")
        self._first_seen[rid] = where
        metadata = item.get("metadata") or {}
        return Record(id=rid, text=item["text"], metadata=metadata if isinstance(metadata, dict) else {})


def _id_of(item: dict[str, Any]) -> str | None:
    rid = item.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return None
    rid = str(rid).strip()
    return rid or None


def _check_one(where: str, item: dict[str, Any], max_record_bytes: int) -> RecordProblem | None:
    rid = _id_of(item)
    if rid is None:
        return RecordProblem(where, 'missing "id" (a non-empty string or integer)', None, "id")
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
    try:
        if meta:  # only metadata can still hold a lone surrogate; most records have none
            json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        return RecordProblem(where, f'record {rid!r}: "metadata" holds text that is not valid UTF-8', rid, "metadata")
    return None
