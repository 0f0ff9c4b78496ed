"""Batches that arrive as a stream (``medq api``'s ``POST /v1/batches``).

A body is read chunk by chunk. :class:`BodyParser` cuts it into raw records (JSON
lines, or the items of one JSON array) holding at most one record's bytes, and
:class:`Upload` checks each record and parks it in Redis (sealed when
``MEDQ_ENCRYPTION_KEY`` is set; the hash expires on its own), so memory holds ids,
not notes. Only when the whole body has been read and checked does ``commit`` turn
the parked records into jobs, all or none, as ``medq enqueue`` does for a file.

Why not ijson for the array: it streams items but tells no position, and every
problem must name its line. ``json.JSONDecoder.raw_decode`` reads one item at a
time from a known offset, so the line of each item is counted on the way.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from typing import Any

from medq.core.errors import InputError
from medq.state.uploads import StagedUpload
from producer.enqueue import BatchHasher, EnqueueResult, Producer
from producer.records import (
    RawItem,
    Record,
    RecordChecker,
    RecordProblem,
    json_error_text,
    limits_of,
    object_or_problem,
    parse_jsonl_line,
)

MAX_PROBLEMS_KEPT = 1000  # more are counted, not kept
_CHUNK = 128


def max_item_bytes(max_record_bytes: int) -> int:
    """The longest line (or array item) a record within MEDQ_MAX_RECORD_BYTES can need:
    JSON escapes can make text up to 6 times longer, plus room for id and metadata."""
    return 6 * max_record_bytes + 64 * 1024


class BodyParser:
    """Raw records from a body fed in chunks: JSON lines, or one JSON array of objects
    (told apart by the first byte that is not white space). ``where`` is ``line N`` or
    ``item N (line L)``. A body that cannot be read past some point (a broken array,
    invalid UTF-8 inside an array) sets ``fatal``; everything after it is ignored."""

    def __init__(self, max_item: int) -> None:
        self.max_item = max_item
        self.mode: str | None = None  # "jsonl" or "array"
        self.fatal: RecordProblem | None = None
        self._buf = bytearray()
        self._line = 1  # jsonl: number of the line in _buf
        self._skipping = False  # jsonl: inside an over-long line
        self._text = ""  # array: decoded and not yet consumed
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._json = json.JSONDecoder()
        self._state = "start"  # array: start, first, value, comma, done
        self._items = 0

    def feed(self, chunk: bytes) -> list[RawItem]:
        if self.fatal is not None or not chunk:
            return []
        if self.mode is None:
            stripped = chunk.lstrip()
            if not stripped:
                self._buf += chunk  # only white space so far; keep its newlines for line numbers
                return []
            self.mode = "array" if stripped[:1] == b"[" else "jsonl"
            chunk, self._buf = bytes(self._buf) + chunk, bytearray()
        return self._feed_jsonl(chunk, final=False) if self.mode == "jsonl" else self._feed_array(chunk, final=False)

    def end(self) -> list[RawItem]:
        if self.fatal is not None or self.mode is None:
            return []
        if self.mode == "jsonl":
            return self._feed_jsonl(b"", final=True)
        out = self._feed_array(b"", final=True)
        if self.fatal is None and self._state != "done":
            self._fail("the body ends before the JSON array is closed with ']'")
        return out

    # ------------------------------------------------------------ JSON lines

    def _feed_jsonl(self, chunk: bytes, final: bool) -> list[RawItem]:
        out: list[RawItem] = []
        buf = self._buf
        search = len(buf)  # what was kept holds no newline
        buf += chunk
        begin = 0
        while (nl := buf.find(b"\n", search)) >= 0:
            if self._skipping:
                self._skipping = False
            elif nl - begin > self.max_item:
                out.append(self._too_long())
            else:
                item = parse_jsonl_line(bytes(buf[begin:nl]), f"line {self._line}")
                if item is not None:
                    out.append(item)
            self._line += 1
            begin = search = nl + 1
        del buf[:begin]
        if len(buf) > self.max_item and not self._skipping:
            out.append(self._too_long())
            self._skipping = True
        if self._skipping:
            buf.clear()
        if final and buf and not self._skipping:
            item = parse_jsonl_line(bytes(buf), f"line {self._line}")
            if item is not None:
                out.append(item)
            buf.clear()
        return out

    def _too_long(self) -> RawItem:
        where = f"line {self._line}"
        return where, RecordProblem(where, f"line is longer than {self.max_item} bytes "
                                           "(a record holds at most MEDQ_MAX_RECORD_BYTES of text)")

    # ------------------------------------------------------------ one JSON array

    def _feed_array(self, chunk: bytes, final: bool) -> list[RawItem]:
        try:
            self._text += self._decoder.decode(chunk, final)
        except UnicodeDecodeError:
            self._fail("not valid UTF-8; a JSON array cannot be read past it")
            return []
        out: list[RawItem] = []
        text, pos = self._text, 0
        while self.fatal is None:
            pos = self._skip_space(text, pos)
            if pos == len(text):
                break
            c = text[pos]
            if self._state == "start":
                if c != "[":
                    self._fail("expected a JSON array of records or JSON lines")
                    break
                pos += 1
                self._state = "first"
            elif self._state in ("first", "value"):
                if c == "]" and self._state == "first":
                    pos += 1
                    self._state = "done"
                    continue
                try:
                    obj, end = self._json.raw_decode(text, pos)
                except (ValueError, RecursionError) as exc:
                    if not final and len(text) - pos <= self.max_item:
                        break  # the item may go on in the next chunk
                    if len(text) - pos > self.max_item:
                        self._fail(f"item {self._items + 1} is longer than {self.max_item} bytes or not valid JSON")
                    else:
                        self._fail(f"item {self._items + 1}: not valid JSON ({json_error_text(exc, 'the body')})")
                    break
                if end - pos > self.max_item:  # as it would be had it come in small chunks
                    self._fail(f"item {self._items + 1} is longer than {self.max_item} bytes")
                    break
                self._items += 1
                where = f"item {self._items} (line {self._line})"
                out.append((where, object_or_problem(obj, where)))
                self._line += text.count("\n", pos, end)
                pos = end
                self._state = "comma"
            elif self._state == "comma":
                if c not in ",]":
                    self._fail(f"expected ',' or ']' after item {self._items}")
                    break
                pos += 1
                self._state = "value" if c == "," else "done"
            else:
                self._fail("unexpected data after the JSON array's closing ']'")
                break
        self._text = text[pos:]
        return out

    def _skip_space(self, text: str, pos: int) -> int:
        n = len(text)
        while pos < n and text[pos] in " \t\r\n":
            if text[pos] == "\n":
                self._line += 1
            pos += 1
        return pos

    def _fail(self, message: str) -> None:
        where = f"line {self._line}"
        self.fatal = RecordProblem(where, message)
        self._text = ""


class Upload:
    """A batch arriving record by record: each good record is parked in Redis as it
    comes; ``commit`` makes the jobs (all or none) and the parked copies go away."""

    def __init__(self, producer: Producer, schema: str, salt: str = "") -> None:
        self.producer = producer
        self.schema = producer.schema_loader.get(schema)  # UnknownSchema
        self.staged = StagedUpload(producer.r)
        self.key = self.staged.key  # the hash the records are parked in
        self.checker = RecordChecker(**limits_of(producer.settings))
        self.record_ids: list[str] = []
        self.digests: list[str] = []  # one per record id: tells a corrected record from the same one
        self.problems: list[RecordProblem] = []
        self.problem_count = 0
        self._hasher = BatchHasher(self.schema.name, self.schema.version, salt)
        self._pending: dict[str, str] = {}  # position -> sealed payload

    def add(self, items: Iterable[RawItem]) -> None:
        for where, item in items:
            checked = self.checker.check(where, item)
            if isinstance(checked, RecordProblem):
                self.note_problem(checked)
            else:
                self._stage(checked)
        if len(self._pending) >= _CHUNK:
            self.flush()

    def note_problem(self, problem: RecordProblem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(problem)

    def _stage(self, rec: Record) -> None:
        item = self.producer.job_item(rec, self._hasher)
        self._pending[str(len(self.record_ids))] = item.payload  # parked; its job is written at commit
        self.record_ids.append(item.record_id)
        self.digests.append(item.digest)

    def flush(self) -> None:
        if not self._pending:
            return
        self.staged.park(self._pending)
        self._pending = {}

    def batch_id(self, batch: str | None = None) -> str:
        return batch or self._hasher.batch_id()

    def commit(self, batch: str | None = None, skip_invalid: bool = False) -> EnqueueResult:
        """Write and send the jobs; raises ``InputError`` (nothing enqueued) if a record
        was bad and ``skip_invalid`` is off. The parked records are gone afterwards."""
        try:
            if self.problems and not skip_invalid:
                raise InputError(self.problems)
            self.flush()
            items = ((rid, str(i), digest) for i, (rid, digest) in enumerate(zip(self.record_ids, self.digests, strict=True)))
            return self.producer.write_jobs(self.batch_id(batch), self.schema, items, staged=self.key)
        finally:
            self.discard()

    def discard(self) -> None:
        self._pending = {}
        self.staged.discard()


def problem_json(p: RecordProblem) -> dict[str, Any]:
    """A problem for an HTTP answer: where, the line, the field and the record id; never text."""
    line = None
    if "line " in p.where:
        digits = p.where.rsplit("line ", 1)[1].rstrip(")")
        line = int(digits) if digits.isdigit() else None
    return {"where": p.where, "line": line, "field": p.field, "record_id": p.record_id, "message": p.message}
