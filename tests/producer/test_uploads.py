"""The streaming body parser: the same records and problems, with the same line numbers,
however the body is cut into chunks."""

from __future__ import annotations

import json

import pytest

from producer.records import RecordProblem
from producer.uploads import BodyParser

JSONL = (
    b'\n  \n{"id": "a", "text": "one"}\r\n'
    b'{"id": "b", "text": "two \\u00e9 \\n ]"}\n'
    b"not json\n"
    b'\xff{"id": "c"}\n'
    b'[1, 2]\n'
    + b'{"id": "long", "text": "' + b"x" * 300 + b'"}\n'
    b'{"id": "d", "text": "\xe4\xb8\xad\xe6\x96\x87"}'
)
ARRAY = (
    b' \n[\n {"id": "a", "text": "one ] , ["},\n'
    b' {"id": "b", "text": "\xe4\xb8\xad\xe6\x96\x87 \\" }"}, 7,\n'
    b'\n {"id": "c", "text": "three", "metadata": {"k": [1, {"n": null}]}}\n]\n'
)


def _parse(body: bytes, size: int, max_item: int = 200) -> tuple[list[tuple[str, object]], RecordProblem | None]:
    parser = BodyParser(max_item)
    out = []
    for i in range(0, len(body), size):
        out += parser.feed(body[i : i + size])
    out += parser.end()
    return [(where, item.message if isinstance(item, RecordProblem) else item) for where, item in out], parser.fatal


@pytest.mark.parametrize("size", [1, 2, 3, 5, 17, 64, 10_000])
def test_json_lines_in_any_chunks(size: int) -> None:
    items, fatal = _parse(JSONL, size)
    assert fatal is None
    assert items == [
        ("line 3", {"id": "a", "text": "one"}),
        ("line 4", {"id": "b", "text": "two \u00e9 \n ]"}),
        ("line 5", "not valid JSON (Expecting value at column 1)"),
        ("line 6", "not valid UTF-8 (byte 0 of the line)"),
        ("line 7", 'expected a JSON object like {"id": ..., "text": ...}'),
        ("line 8", "line is longer than 200 bytes (a record holds at most MEDQ_MAX_RECORD_BYTES of text)"),
        ("line 9", {"id": "d", "text": "中文"}),
    ]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 17, 64, 10_000])
def test_a_json_array_in_any_chunks(size: int) -> None:
    items, fatal = _parse(ARRAY, size)
    assert fatal is None
    assert items == [
        ("item 1 (line 3)", {"id": "a", "text": "one ] , ["}),
        ("item 2 (line 4)", {"id": "b", "text": '中文 " }'}),
        ("item 3 (line 4)", 'expected a JSON object like {"id": ..., "text": ...}'),
        ("item 4 (line 6)", {"id": "c", "text": "three", "metadata": {"k": [1, {"n": None}]}}),
    ]


@pytest.mark.parametrize(("body", "where", "message"), [
    (b'[{"id": "a", "text": "x"} {"id": "b"}]', "line 1", "expected ',' or ']' after item 1"),
    (b'[{"id": "a", "text": "x"},\n{"id": "b", "te', "line 2", "item 2: not valid JSON"),
    (b'[{"id": "a", "text": "x"}', "line 1", "the body ends before the JSON array is closed"),
    (b'[{"id": "a", "text": "x"}] {"id": "b"}', "line 1", "unexpected data after the JSON array's closing ']'"),
    (b'[{"id": "a", "text": "\xff"}]', "line 1", "not valid UTF-8"),
    (b'[{"id": "a", "text": "' + b"y" * 400 + b'"}]', "line 1", "item 1 is longer than 200 bytes"),
    (b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]", "line 1", "item 1"),
])
def test_a_broken_array_stops_with_the_line(body: bytes, where: str, message: str) -> None:
    for size in (1, 7, len(body)):
        _, fatal = _parse(body, size)
        assert fatal is not None and fatal.where == where and message in fatal.message, (size, fatal)


def test_the_array_items_before_a_break_are_kept() -> None:
    items, fatal = _parse(b'[{"id": "a", "text": "x"}, {"id": "b", "text": "y"} x', 4)
    assert [w for w, _ in items] == ["item 1 (line 1)", "item 2 (line 1)"] and fatal is not None


def test_many_lines_hold_one_line_at_a_time() -> None:
    line = json.dumps({"id": "r", "text": "z" * 150}).encode() + b"\n"
    parser = BodyParser(200)
    n = 0
    for _ in range(5000):
        n += len(parser.feed(line))
        assert len(parser._buf) <= len(line)
    assert n + len(parser.end()) == 5000
