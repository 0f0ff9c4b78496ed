"""Input checks of issue 14: a bad CSV quote, NaN in metadata, oversized ids and metadata,
batch ids that make job ids collide, and malformed schema files. Each is refused (or, for
a schema file, contained) where the records enter: the readers, ``enqueue``, the CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from medq.core.contract import batch_key, failed_key, job_key, make_job_id
from medq.core.errors import InvalidBatchId, SchemaError, SchemaVersionUnavailable
from medq.core.schemas import SchemaLoader
from medq.core.settings import REPO_ROOT, Settings
from producer import InputError, enqueue
from producer.records import check, from_objects, read_path
from tests.helpers import run_cli


@pytest.fixture
def settings(r: redis.Redis, redis_url: str) -> Settings:
    return Settings(redis_url=redis_url)


# ---------------------------------------------------------------- 1. CSV quotes

FOUR_PATIENTS = (
    "id,text,ward\n"
    'p1,"Patient one, 70 y. Metformin 500 mg,3B\n'  # the quote is never closed
    "p2,Patient two, 54 y. Warfarin.,4A\n"
    'p3,"Patient three, 81 y.",5C\n'
    "p4,Patient four.,6D\n"
)


def test_an_unclosed_csv_quote_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "ward.csv"
    path.write_text(FOUR_PATIENTS, encoding="utf-8")
    checked = check(read_path(path))
    assert checked.records == []  # before: one record holding four patients' notes
    [problem] = checked.problems
    assert problem.where == "ward.csv:2"
    assert "quoted field" in problem.message and '""' in problem.message
    assert "Metformin" not in str(problem)


def test_a_quote_that_pairs_up_with_a_later_one_is_refused(tmp_path: Path) -> None:
    # Strict parsing accepts this (the stray quote closes at the end of p3's line), but p2's
    # and p3's rows would be read as p1's text.
    path = tmp_path / "ward.csv"
    path.write_text('id,text\np1,"Patient one, said ""no""\np2,Patient two\np3,Patient three"\np4,four\n',
                    encoding="utf-8")
    checked = check(read_path(path))
    assert [r.id for r in checked.records] == ["p4"]
    [problem] = checked.problems
    assert problem.where == "ward.csv:2" and "start of another row" in problem.message


def test_cli_refuses_the_merged_csv_and_enqueues_nothing(r: redis.Redis, medq_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "ward.csv"
    path.write_text('id,text\np1,"Patient one, 70 y.\np2,Patient two\np3,Patient three\np4,Patient four\n', encoding="utf-8")
    res = run_cli(["enqueue", str(path), "--schema", "clinical_note"], medq_env)
    assert res.returncode == 2, res.stderr  # before: exit 0, "1 jobs"
    assert "ward.csv:2" in res.stderr and "nothing was enqueued" in res.stderr
    assert "Traceback" not in res.stderr
    assert r.dbsize() == 0


_ID = st.text(st.sampled_from("abcXYZ0129-_.:/ 你"), min_size=1, max_size=12).map(str.strip).filter(bool)
_TEXT = st.lists(
    st.one_of(st.sampled_from([",", '"', "\n", "\r\n", "\r", " ", "患者", "男", "💊", "😀", "a", "1", ";", "'"]),
              st.characters(exclude_categories=("Cs",))),
    min_size=1, max_size=30,
).map("".join).filter(lambda t: bool(t.strip()))
_COLUMN = st.sampled_from(["ward", "mrn", "病区", "note date"])
_RECORDS = st.lists(
    st.fixed_dictionaries({"id": _ID, "text": _TEXT, "metadata": st.dictionaries(_COLUMN, _TEXT, max_size=2)}),
    min_size=1, max_size=6, unique_by=lambda rec: rec["id"],
)


def _as_csv(records: list[dict[str, Any]], quoting: int = csv.QUOTE_MINIMAL) -> str:
    columns = sorted({k for rec in records for k in rec["metadata"]})
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, quoting=quoting)
    writer.writerow(["id", "text", *columns])
    for rec in records:
        writer.writerow([rec["id"], rec["text"], *(rec["metadata"].get(c, "") for c in columns)])
    return buf.getvalue()


def _read(path: Path) -> list[dict[str, Any]]:
    checked = check(read_path(path))
    assert checked.problems == []
    return [rec.model_dump() for rec in checked.records]


def _csv_meta(rec: dict[str, Any], columns: set[str]) -> dict[str, Any]:
    return {c: rec["metadata"].get(c, "") for c in columns}


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=_RECORDS)
def test_records_survive_csv_and_jsonl(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    """records -> CSV (the csv module) and JSONL -> medq's readers -> the same records."""
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records), encoding="utf-8")
    assert _read(jsonl) == records
    columns = {k for rec in records for k in rec["metadata"]}
    path = tmp_path / "in.csv"
    path.write_bytes(_as_csv(records).encode("utf-8"))
    checked = check(read_path(path))
    if checked.problems:  # only the rule that refuses what reads as merged rows may refuse a well-formed CSV
        assert all("start of another row" in p.message for p in checked.problems), checked.problems
        return
    assert [rec.model_dump() for rec in checked.records] == [
        {**rec, "metadata": _csv_meta(rec, columns)} for rec in records
    ]


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=_RECORDS, data=st.data())
def test_a_csv_with_one_closing_quote_lost_is_refused(tmp_path: Path, records: list[dict[str, Any]], data: Any) -> None:
    """The same records written with every field quoted, then one text's closing quote
    deleted: the reader must say so, never hand back fewer, merged records. (On the code
    before issue 14 this fails at once: the rows after it became that record's text.)"""
    i = data.draw(st.integers(0, len(records) - 1))
    columns = sorted({k for rec in records for k in rec["metadata"]})
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL)
    writer.writerow(["id", "text", *columns])
    for n, rec in enumerate(records):
        if n == i:  # where this row's text field closes: '"id","text' then the quote
            closing = buf.tell() + len('"{}","{}'.format(rec["id"].replace('"', '""'), rec["text"].replace('"', '""')))
        writer.writerow([rec["id"], rec["text"], *(rec["metadata"].get(c, "") for c in columns)])
    text = buf.getvalue()
    assert text[closing] == '"'
    broken = text[:closing] + text[closing + 1 :]
    path = tmp_path / "in.csv"
    path.write_bytes(broken.encode("utf-8"))
    checked = check(read_path(path))
    # A lost quote can leave a well-formed CSV (a text holding '","' then reads as two
    # fields); what must never happen is rows merged into one record without a word.
    assert checked.problems or len(checked.records) == len(records), "rows were merged silently"


# ---------------------------------------------------------------- 2. NaN and Infinity


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_metadata_are_refused_by_line_and_field(tmp_path: Path, raw: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "ok", "text": "fine"}\n'
                    f'{{"id": "n1", "text": "note", "metadata": {{"ward": "3B", "vitals": {{"spo2": [97, {raw}]}}}}}}\n',
                    encoding="utf-8")
    checked = check(read_path(path))
    assert [rec.id for rec in checked.records] == ["ok"]
    [problem] = checked.problems
    assert problem.where == "in.jsonl:2" and problem.field == "metadata"
    assert "vitals.spo2[1]" in problem.message and "not a finite number" in problem.message
    assert raw not in problem.message.replace("NaN or Infinity", "")


def test_python_enqueue_refuses_nan_and_enqueues_nothing(r: redis.Redis, settings: Settings) -> None:
    with pytest.raises(InputError) as exc:
        enqueue([{"id": "a", "text": "x"}, {"id": "b", "text": "y", "metadata": {"score": math.inf}}],
                schema="clinical_note", settings=settings)
    assert "record 2: record 'b'" in str(exc.value) and "score" in str(exc.value)
    assert r.dbsize() == 0


# ---------------------------------------------------------------- 3. sizes of ids and metadata


def test_long_ids_and_large_metadata_are_refused() -> None:
    checked = check(from_objects([
        {"id": "x" * 1_000_000, "text": "note"},
        {"id": "m", "text": "note", "metadata": {"blob": "y" * 100_000}},
        {"id": "ok", "text": "note", "metadata": {"ward": "3B"}},
    ]))
    assert [rec.id for rec in checked.records] == ["ok"]
    id_problem, meta_problem = checked.problems
    assert id_problem.where == "record 1" and "1000000 characters, over the limit of 256 (MEDQ_MAX_ID_CHARS)" in str(id_problem)
    assert len(str(id_problem)) < 200  # the id itself is not repeated
    assert "over the limit of 65536 (MEDQ_MAX_METADATA_BYTES)" in str(meta_problem)


def test_cli_limits_come_from_settings(r: redis.Redis, medq_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "a" * 20, "text": "note"}) + "\n"
                    + json.dumps({"id": "b", "text": "note", "metadata": {"w": "z" * 200}}) + "\n", encoding="utf-8")
    env = {**medq_env, "MEDQ_MAX_ID_CHARS": "10", "MEDQ_MAX_METADATA_BYTES": "100"}
    res = run_cli(["enqueue", str(path), "--schema", "clinical_note"], env)
    assert res.returncode == 2
    assert "in.jsonl:1" in res.stderr and "MEDQ_MAX_ID_CHARS" in res.stderr
    assert "in.jsonl:2" in res.stderr and "MEDQ_MAX_METADATA_BYTES" in res.stderr
    assert r.dbsize() == 0


# ---------------------------------------------------------------- 4. job-id collisions


def test_the_separator_in_a_part_no_longer_makes_job_ids_meet() -> None:
    assert make_job_id("ward\x1fa", "b", "clinical_note", 1) != make_job_id("ward", "a\x1fb", "clinical_note", 1)
    # every id without the separator, i.e. every job already in Redis, is what it was
    old = hashlib.sha256(b"ward\x1fa,b\x1fclinical_note\x1f1").hexdigest()[:32]
    assert make_job_id("ward", "a,b", "clinical_note", 1) == old


@pytest.mark.parametrize("batch", ["ward\x1fa", "ward 3", "-lead", "x" * 129, "ward/3", "é"])
def test_enqueue_refuses_a_batch_id_outside_the_pattern(r: redis.Redis, settings: Settings, batch: str) -> None:
    with pytest.raises(InvalidBatchId, match="is not allowed"):
        enqueue([{"id": "b", "text": "x"}], schema="clinical_note", batch=batch, settings=settings)
    assert r.dbsize() == 0


def test_record_ids_with_the_separator_are_two_jobs(r: redis.Redis, settings: Settings) -> None:
    # batch "ward" + records "a\x1fb" and "a": before, "ward\x1fa" + "b" met the first one
    ids = enqueue([{"id": "a\x1fb", "text": "x"}, {"id": "a", "text": "y"}], schema="clinical_note",
                  batch="ward", settings=settings)
    assert len(set(ids)) == 2 and r.scard(batch_key("ward")) == 2


def test_cli_refuses_a_bad_batch_id_and_takes_the_usual_ones(r: redis.Redis, medq_env: dict[str, str]) -> None:
    res = run_cli(["enqueue", "-", "--schema", "clinical_note", "--batch", "ward\x1fa"], medq_env,
                  stdin='{"id": "b", "text": "x"}\n')
    assert res.returncode == 2 and "is not allowed" in res.stderr and "Traceback" not in res.stderr
    assert r.dbsize() == 0
    for batch in ("ward-3B.2026-01:night@icu", "b-0123456789ab"):
        res = run_cli(["enqueue", "-", "--schema", "clinical_note", "--batch", batch], medq_env,
                      stdin='{"id": "b", "text": "x"}\n')
        assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------- 5. malformed schema files

SHIPPED = REPO_ROOT / "configs" / "schemas"
BROKEN_YAML = "name: ward_note\nversion: 1\nfields:\n  age: {type: integer\n  sex: {type: string}\n"


def _bad_schema_dir(tmp_path: Path) -> Path:
    d = tmp_path / "schemas"
    d.mkdir()
    (d / "ward_note.yaml").write_text(BROKEN_YAML, encoding="utf-8")
    (d / "typo.yaml").write_text("name: typo_note\nfields:\n  age: {type: int}\n", encoding="utf-8")
    return d


def test_a_bad_schema_file_disables_only_its_own_schema(tmp_path: Path) -> None:
    d = _bad_schema_dir(tmp_path)
    loader = SchemaLoader([SHIPPED, d])  # before: SchemaError, and no schema at all
    assert "clinical_note" in loader.names()
    assert {(p.name, p.path.name) for p in loader.problems} == {("ward_note", "ward_note.yaml"), ("typo_note", "typo.yaml")}
    with pytest.raises(SchemaError) as exc:
        loader.get("ward_note")
    assert f"{d / 'ward_note.yaml'}, line " in exc.value.message and "not valid YAML" in exc.value.message
    with pytest.raises(SchemaError, match="field 'age': unknown type 'int'"):
        loader.get("typo_note")
    with pytest.raises(SchemaVersionUnavailable, match="could not load"):  # a worker: the job waits for one that has it
        loader.get("ward_note", 1)


def test_a_broken_newest_file_is_not_quietly_replaced_by_an_older_version(tmp_path: Path) -> None:
    d = tmp_path / "schemas"
    d.mkdir()
    (d / "lab.v1.yaml").write_text("name: lab\nversion: 1\nfields:\n  a: {type: string}\n", encoding="utf-8")
    (d / "lab.yaml").write_text("name: lab\nversion: 2\nfields:\n  a: {type: strin}\n", encoding="utf-8")
    loader = SchemaLoader([d])
    with pytest.raises(SchemaError, match="lab.yaml"):
        loader.get("lab")
    assert loader.get("lab", 1).version == 1  # jobs enqueued under version 1 still run


def test_cli_with_a_bad_schema_file(r: redis.Redis, medq_env: dict[str, str], tmp_path: Path) -> None:
    env = {**medq_env, "MEDQ_SCHEMAS_DIRS": str(_bad_schema_dir(tmp_path))}
    note = '{"id": "a", "text": "x"}\n'
    res = run_cli(["enqueue", "-", "--schema", "clinical_note", "--batch", "good"], env, stdin=note)
    assert res.returncode == 0, res.stderr  # before: a traceback and exit 1
    assert "warning" in res.stderr and "ward_note.yaml" in res.stderr
    assert r.scard(batch_key("good")) == 1

    res = run_cli(["enqueue", "-", "--schema", "ward_note"], env, stdin=note)
    assert res.returncode == 2 and "ward_note.yaml, line " in res.stderr and "not valid YAML" in res.stderr
    assert "Traceback" not in res.stderr

    res = run_cli(["schemas", "list"], env)
    assert res.returncode == 2 and "clinical_note" in res.stdout
    assert "problem" in res.stderr and "ward_note.yaml" in res.stderr and "typo.yaml" in res.stderr

    res = run_cli(["schemas", "show", "typo_note"], env)
    assert res.returncode == 2 and "unknown type 'int'" in res.stderr and "Traceback" not in res.stderr


def test_requeue_refuses_jobs_whose_schema_file_broke(r: redis.Redis, medq_env: dict[str, str], tmp_path: Path) -> None:
    d = tmp_path / "schemas"
    d.mkdir()
    good = "name: ward_note\nversion: 1\nfields:\n  age: {type: [integer, 'null']}\n"
    (d / "ward_note.yaml").write_text(good, encoding="utf-8")
    env = {**medq_env, "MEDQ_SCHEMAS_DIRS": str(d)}
    res = run_cli(["enqueue", "-", "--schema", "ward_note", "--batch", "w"], env, stdin='{"id": "a", "text": "x"}\n')
    assert res.returncode == 0, res.stderr
    [job_id] = [m.decode() for m in r.smembers(batch_key("w"))]
    # as a worker leaves a job that failed on a server error (no worker needed for that)
    r.hset(job_key(job_id), mapping={"status": "failed", "error_kind": "server_error", "error_message": "HTTP 500"})
    r.zadd(failed_key("w"), {job_id: 1})
    (d / "ward_note.yaml").write_text(BROKEN_YAML, encoding="utf-8")
    res = run_cli(["requeue", "w"], env)
    assert res.returncode == 2, res.stderr  # before: a traceback and exit 1
    assert "nothing was requeued" in res.stderr and "ward_note.yaml, line " in res.stderr
    assert "Traceback" not in res.stderr
    assert r.zcard(failed_key("w")) == 1


def test_a_worker_reports_a_bad_schema_file_and_serves_the_others(
    r: redis.Redis, medq_env: dict[str, str], simulator: Any, worker_process: Any, tmp_path: Path,
) -> None:
    d = _bad_schema_dir(tmp_path)
    env = {**medq_env, "MEDQ_SCHEMAS_DIRS": str(d)}
    proc = worker_process(simulator(), env={"MEDQ_SCHEMAS_DIRS": str(d)})  # before: "cannot start", exit 2
    assert "ward_note.yaml, line " in proc.log and "field 'age': unknown type 'int'" in proc.log
    res = run_cli(["enqueue", "-", "--schema", "clinical_note", "--batch", "served", "--wait", "--timeout-s", "90"],
                  env, stdin='{"id": "a", "text": "72-year-old woman on metformin."}\n')
    assert res.returncode == 0, res.stderr
