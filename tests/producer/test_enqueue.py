"""Producer: input validation (one case per bad input), ids only on the broker, idempotency."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
import redis

from medq.core.contract import QUEUE, batch_key, job_key, payload_key
from medq.core.errors import UnknownSchema
from medq.core.settings import Settings
from producer import InputError, enqueue
from producer.records import check, read_path
from tests.helpers import MEDQ, run_cli


@pytest.fixture
def settings(r: redis.Redis, redis_url: str) -> Settings:
    return Settings(redis_url=redis_url)


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(x) for x in rows) + "\n", encoding="utf-8")
    return path


def _queued_messages(r: redis.Redis) -> list[dict]:
    return [json.loads(m) for m in r.lrange(QUEUE, 0, -1)]


def _queued_job_ids(r: redis.Redis) -> list[str]:
    """Every job id in the queued messages: one per medq.extract, a list per medq.extract_many."""
    out: list[str] = []
    for msg in _queued_messages(r):
        [arg] = json.loads(base64.b64decode(msg["body"]))[0]
        out += arg if msg["headers"]["task"] == "medq.extract_many" else [arg]
    return out


def test_enqueue_stores_payload_and_sends_only_the_id(r: redis.Redis, settings: Settings) -> None:
    ids = enqueue([{"id": "a", "text": "CANARY-7f3 seventy-year-old", "metadata": {"ward": "3B"}}],
                  schema="clinical_note", batch="b1", settings=settings)
    assert len(ids) == 1 and ids.batch == "b1" and ids.created == 1
    job_id = ids[0]
    payload = json.loads(r.get(payload_key(job_id)))
    assert payload == {"text": "CANARY-7f3 seventy-year-old", "metadata": {"ward": "3B"}}
    assert 0 < r.ttl(payload_key(job_id)) <= settings.payload_ttl_s
    state = {k.decode(): v.decode() for k, v in r.hgetall(job_key(job_id)).items()}
    assert state["status"] == "queued" and state["record_id"] == "a" and state["schema"] == "clinical_note"
    assert "CANARY" not in json.dumps(state)
    [msg] = _queued_messages(r)
    assert json.loads(base64.b64decode(msg["body"]))[0] == [job_id]
    assert "CANARY" not in json.dumps(msg) and "CANARY" not in base64.b64decode(msg["body"]).decode()


def test_same_records_twice_runs_nothing_twice(r: redis.Redis, settings: Settings) -> None:
    recs = [{"id": f"r{i}", "text": f"note {i}"} for i in range(5)]
    first = enqueue(recs, schema="clinical_note", settings=settings)
    second = enqueue(recs, schema="clinical_note", settings=settings)
    assert first.batch == second.batch  # the default batch id comes from the content
    assert list(first) == list(second)
    assert second.created == 0 and second.sent == 0
    assert sorted(_queued_job_ids(r)) == sorted(first)  # each job sent once, by the first call only
    assert r.scard(batch_key(first.batch)) == 5


def test_jobs_travel_several_to_a_message(r: redis.Redis, redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, jobs_per_message=16)
    ids = enqueue([{"id": f"r{i}", "text": f"CANARY-9c1 note {i}"} for i in range(40)], schema="clinical_note",
                  batch="b", settings=settings)
    msgs = _queued_messages(r)
    assert [m["headers"]["task"] for m in msgs] == ["medq.extract_many"] * 3
    assert sorted(len(json.loads(base64.b64decode(m["body"]))[0][0]) for m in msgs) == [8, 16, 16]
    assert sorted(_queued_job_ids(r)) == sorted(ids)
    assert not any(b"CANARY" in base64.b64decode(m["body"]) for m in msgs)


def test_job_whose_message_was_never_sent_is_sent_on_rerun(r: redis.Redis, settings: Settings) -> None:
    recs = [{"id": "a", "text": "note"}]
    first = enqueue(recs, schema="clinical_note", batch="b", settings=settings)
    # as if the producer died between writing the job and sending its message
    r.delete(QUEUE)
    r.hdel(job_key(first[0]), "sent")
    second = enqueue(recs, schema="clinical_note", batch="b", settings=settings)
    assert second.created == 0 and second.sent == 1
    assert len(_queued_messages(r)) == 1


def test_different_schema_or_batch_is_a_different_job(r: redis.Redis, settings: Settings) -> None:
    recs = [{"id": "a", "text": "note"}]
    a = enqueue(recs, schema="clinical_note", batch="b", settings=settings)
    b = enqueue(recs, schema="discharge_summary", batch="b", settings=settings)
    c = enqueue(recs, schema="clinical_note", batch="other", settings=settings)
    assert len({a[0], b[0], c[0]}) == 3


def test_unknown_schema_enqueues_nothing(r: redis.Redis, settings: Settings) -> None:
    with pytest.raises(UnknownSchema, match="clinical_note"):
        enqueue([{"id": "a", "text": "x"}], schema="nope", settings=settings)
    assert r.dbsize() == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"text": "no id here"}, 'missing "id"'),
        ({"id": "", "text": "x"}, 'missing "id"'),
        ({"id": "e", "text": "   "}, "text is empty"),
        ({"id": "e"}, 'missing "text"'),
        ({"id": "e", "text": "x", "metadata": "ward 3"}, '"metadata" must be an object'),
        ({"id": "e", "text": "\udc80 lone surrogate"}, "not valid UTF-8"),
        ({"id": "e", "text": "x", "metadata": {"ward": "\udc80"}}, '"metadata" holds text that is not valid UTF-8'),
        ("not an object", "expected a JSON object"),
    ],
)
def test_each_bad_record_is_named_with_its_line(tmp_path: Path, line: object, message: str) -> None:
    path = _write_jsonl(tmp_path / "in.jsonl", [{"id": "ok", "text": "fine"}, line])
    checked = check(read_path(path))
    [problem] = checked.problems
    assert problem.where == "in.jsonl:2"
    assert message in problem.message
    assert [rec.id for rec in checked.records] == ["ok"]


@pytest.mark.parametrize(("raw", "message"), [
    ('{"id": "e", "text": "x", "n": ' + "7" * 5000 + "}", "not valid JSON (a number too long to read)"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)"),
])
def test_json_that_python_refuses_is_a_bad_line_not_a_crash(tmp_path: Path, raw: str, message: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "ok", "text": "fine"}) + "\n" + raw + "\n", encoding="utf-8")
    checked = check(read_path(path))
    assert [(p.where, p.message) for p in checked.problems] == [("in.jsonl:2", message)]


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}])
    [problem] = check(read_path(path)).problems
    assert str(problem) == "in.jsonl:3: duplicate id 'a' (first at in.jsonl:1)"


def test_oversized_text_and_invalid_json_and_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        json.dumps({"id": "big", "text": "x" * 300}).encode() + b"\n"
        + b'{"id": "broken", "text": \n'
        + b'{"id": "latin1", "text": "caf\xe9"}\n'
    )
    problems = check(read_path(path), max_record_bytes=100).problems
    assert [p.where for p in problems] == ["in.jsonl:1", "in.jsonl:2", "in.jsonl:3"]
    assert "300 bytes, over the limit of 100" in problems[0].message
    assert "not valid JSON" in problems[1].message
    assert "not valid UTF-8" in problems[2].message


def test_problem_messages_never_quote_the_text(tmp_path: Path) -> None:
    canary = "CANARY-TEXT-91"
    path = _write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": canary * 20}, {"id": "a", "text": canary}])
    problems = check(read_path(path), max_record_bytes=50).problems
    assert problems and all(canary not in str(p) for p in problems)


def test_csv_and_folder_inputs(tmp_path: Path) -> None:
    csv_path = tmp_path / "in.csv"
    csv_path.write_text('id,text,ward\n1,"BP 120/80, HR 70",3B\n2,"multi\nline note",4A\n3,,5C\n', encoding="utf-8")
    checked = check(read_path(csv_path))
    assert [(r.id, r.metadata) for r in checked.records] == [("1", {"ward": "3B"}), ("2", {"ward": "4A"})]
    [problem] = checked.problems
    assert problem.where == "in.csv:5" and "text is empty" in problem.message

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "p1.txt").write_text("患者男，65岁。", encoding="utf-8")
    (folder / "p2.txt").write_bytes(b"ok line\nbad \xff byte\n")
    checked = check(read_path(folder))
    assert [r.id for r in checked.records] == ["p1"]
    assert checked.problems[0].where == "notes/p2.txt" and "line 2" in checked.problems[0].message


def test_python_api_rejects_bad_records_and_enqueues_nothing(r: redis.Redis, settings: Settings) -> None:
    with pytest.raises(InputError) as exc:
        enqueue([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], schema="clinical_note", settings=settings)
    assert "record 2: duplicate id 'a'" in str(exc.value)
    assert r.dbsize() == 0
    ids = enqueue([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], schema="clinical_note",
                  settings=settings, skip_invalid=True)
    assert len(ids) == 1


def _cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(args, env, stdin)


def test_cli_reports_line_numbers_and_enqueues_nothing(r: redis.Redis, medq_env: dict[str, str], tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "notes.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": ""}, {"id": "a", "text": "y"}])
    res = _cli(["enqueue", str(path), "--schema", "clinical_note"], medq_env)
    assert res.returncode == 2
    assert "notes.jsonl:2: record 'b': text is empty" in res.stderr
    assert "notes.jsonl:3: duplicate id 'a'" in res.stderr
    assert "nothing was enqueued" in res.stderr
    assert r.dbsize() == 0

    res = _cli(["enqueue", str(path), "--schema", "clinical_note", "--skip-invalid", "--batch", "b7"], medq_env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "b7"
    assert r.scard(batch_key("b7")) == 1


def test_cli_unknown_schema_and_stdin(r: redis.Redis, medq_env: dict[str, str]) -> None:
    res = _cli(["enqueue", "-", "--schema", "radiology"], medq_env, stdin='{"id": "a", "text": "x"}\n')
    assert res.returncode == 2 and "unknown schema 'radiology'" in res.stderr and "clinical_note" in res.stderr
    assert r.dbsize() == 0
    res = _cli(["enqueue", "-", "--schema", "clinical_note"], medq_env, stdin='{"id": "a", "text": "x"}\n')
    assert res.returncode == 0, res.stderr
    assert r.scard(batch_key(res.stdout.strip())) == 1


@pytest.mark.e2e  # a fresh interpreter: what a producer process imports
def test_producer_does_not_import_the_worker_stack() -> None:
    code = (
        "import sys, producer, medq.state.jobs\n"
        "bad = [m for m in ('worker', 'openai', 'llama_cpp', 'sqlalchemy', 'fastapi') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([str(Path(MEDQ).with_name("python")), "-c", code], check=True, timeout=60)


def test_purge_removes_a_batch_and_its_dead_letters(r: redis.Redis, settings: Settings, redis_url: str) -> None:
    from medq.core.contract import failed_key

    ids = enqueue([{"id": "a", "text": "note a"}, {"id": "b", "text": "note b"}], schema="clinical_note", batch="gone", settings=settings)
    keep = enqueue([{"id": "c", "text": "note c"}], schema="clinical_note", batch="stays", settings=settings)
    r.zadd(failed_key("gone"), {ids[0]: 1.0})  # as a worker records a dead letter
    env = {"MEDQ_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"}
    res = run_cli(["purge", "gone", "--yes"], env)
    assert res.returncode == 0, res.stderr
    assert "2 job state(s), 2 record(s)" in res.stderr
    assert not any(r.exists(k) for j in ids for k in (job_key(j), payload_key(j)))
    assert not r.exists(batch_key("gone")) and not r.exists(failed_key("gone"))
    assert r.exists(payload_key(keep[0])) and r.exists(job_key(keep[0]))


# ---------------------------------------------------------------- corrected records


def _h(r: redis.Redis, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(job_key(job_id)).items()}


def test_same_id_with_other_text_is_a_conflict_and_changes_nothing(r: redis.Redis, settings: Settings) -> None:
    first = enqueue([{"id": "a", "text": "Age 40. CANARY-c0f"}, {"id": "b", "text": "note b"}],
                    schema="clinical_note", batch="b", settings=settings)
    before = {k: r.dump(k) for k in (job_key(first[0]), payload_key(first[0]))}
    r.delete(QUEUE)
    again = enqueue([{"id": "a", "text": "Age 41. CANARY-c0f"}, {"id": "b", "text": "note b"}, {"id": "c", "text": "new"}],
                    schema="clinical_note", batch="b", settings=settings)
    assert again.conflicts == ["a"] and again.replaced == []
    assert again.created == 1 and again.existing == 1  # c is new, b the same
    assert again[0] == first[0]  # the job already there
    assert _queued_job_ids(r) == [again[2]]  # only c was sent
    assert all(r.dump(k) == v for k, v in before.items())  # a's job and note untouched
    assert json.loads(r.get(payload_key(first[0])))["text"] == "Age 40. CANARY-c0f"
    # a metadata change is a change; the same metadata in another key order is not
    m1 = enqueue([{"id": "m", "text": "t", "metadata": {"x": 1, "y": 2}}], schema="clinical_note", batch="b", settings=settings)
    assert enqueue([{"id": "m", "text": "t", "metadata": {"y": 2, "x": 1}}], schema="clinical_note", batch="b",
                   settings=settings).conflicts == []
    m3 = enqueue([{"id": "m", "text": "t", "metadata": {"x": 1, "y": 3}}], schema="clinical_note", batch="b", settings=settings)
    assert m3.conflicts == ["m"] and list(m3) == list(m1)


def test_a_job_written_before_digests_is_taken_as_the_same(r: redis.Redis, settings: Settings) -> None:
    first = enqueue([{"id": "a", "text": "old"}], schema="clinical_note", batch="b", settings=settings)
    r.hdel(job_key(first[0]), "digest")  # as written by an older medq
    again = enqueue([{"id": "a", "text": "other"}], schema="clinical_note", batch="b", settings=settings)
    assert again.conflicts == [] and again.existing == 1 and list(again) == list(first)


def test_replace_makes_a_new_revision_that_takes_the_old_jobs_place(r: redis.Redis, settings: Settings) -> None:
    from medq.core.contract import failed_key, revision_job_id
    from medq.state.jobs import counts, failed, iter_states

    first = enqueue([{"id": "a", "text": "Age 40"}, {"id": "b", "text": "note b"}], schema="clinical_note",
                    batch="b", settings=settings)
    old = first[0]
    r.hset(job_key(old), mapping={"status": "failed", "error_kind": "output_invalid"})  # as a worker records a dead letter
    r.zadd(failed_key("b"), {old: 1.0})
    r.delete(QUEUE)

    rep = enqueue([{"id": "a", "text": "Age 41"}, {"id": "b", "text": "note b"}], schema="clinical_note", batch="b",
                  replace=True, settings=settings)
    new = rep[0]
    assert new == revision_job_id(old, 1) and rep[1] == first[1]
    assert rep.replaced == ["a"] and rep.conflicts == [] and rep.created == 0 and rep.existing == 1
    assert _queued_job_ids(r) == [new]
    assert json.loads(r.get(payload_key(new)))["text"] == "Age 41"
    assert not r.exists(payload_key(old))  # the old note is gone
    assert _h(r, old)["superseded_by"] == new
    assert {x.decode() for x in r.smembers(batch_key("b"))} == {new, first[1]}
    assert r.zcard(failed_key("b")) == 0 and failed(r, "b") == []
    assert [(st.record_id, st.job_id) for st in iter_states(r, "b")] == [("a", new), ("b", first[1])]  # input order kept
    assert counts(r, "b")["queued"] == 2

    # the same correction again creates nothing; the original again is a conflict with the newest revision
    r.delete(QUEUE)
    same = enqueue([{"id": "a", "text": "Age 41"}], schema="clinical_note", batch="b", replace=True, settings=settings)
    assert list(same) == [new] and same.replaced == [] and same.sent == 0 and _queued_job_ids(r) == []
    back = enqueue([{"id": "a", "text": "Age 40"}], schema="clinical_note", batch="b", settings=settings)
    assert back.conflicts == ["a"] and list(back) == [new]
    # a second correction: revision 2 replaces revision 1, and the first job points at it
    third = enqueue([{"id": "a", "text": "Age 42"}], schema="clinical_note", batch="b", replace=True, settings=settings)
    assert list(third) == [revision_job_id(old, 2)]
    assert _h(r, new)["superseded_by"] == third[0] and _h(r, old)["superseded_by"] == third[0]
    assert 0 < r.ttl(job_key(new)) and r.ttl(job_key(old)) == -1  # the first job lives as long as the newest
    assert {x.decode() for x in r.smembers(batch_key("b"))} == {third[0], first[1]}


def test_a_record_whose_newest_revision_is_gone_comes_back_as_a_new_one(r: redis.Redis, settings: Settings) -> None:
    from medq.core.contract import revision_job_id

    first = enqueue([{"id": "a", "text": "one"}], schema="clinical_note", batch="b", settings=settings)
    rev = enqueue([{"id": "a", "text": "two"}], schema="clinical_note", batch="b", replace=True, settings=settings)
    r.delete(job_key(rev[0]))  # its state expired before its first job's did
    back = enqueue([{"id": "a", "text": "two"}], schema="clinical_note", batch="b", settings=settings)
    # never the first job id again: a result may be stored under it, for the old text
    assert back.created == 1 and list(back) == [revision_job_id(first[0], 2)]
    assert json.loads(r.get(payload_key(back[0])))["text"] == "two"


def test_purge_removes_replaced_jobs_too(r: redis.Redis, settings: Settings) -> None:
    from medq.state.jobs import purge

    first = enqueue([{"id": "a", "text": "one"}], schema="clinical_note", batch="b", settings=settings)
    enqueue([{"id": "a", "text": "two"}], schema="clinical_note", batch="b", replace=True, settings=settings)
    enqueue([{"id": "a", "text": "three"}], schema="clinical_note", batch="b", replace=True, settings=settings)
    purge(r, "b")
    assert r.keys("medq:job:*") == [] and r.keys("medq:payload:*") == [], first


def test_cli_names_a_conflict_and_runs_it_with_replace(r: redis.Redis, medq_env: dict[str, str], tmp_path: Path) -> None:
    orig = _write_jsonl(tmp_path / "notes.jsonl", [{"id": "a", "text": "Age 40"}, {"id": "b", "text": "note b"}])
    fixed = _write_jsonl(tmp_path / "fixed.jsonl", [{"id": "a", "text": "Age 41"}, {"id": "b", "text": "note b"},
                                                     {"id": "c", "text": "note c"}])
    assert _cli(["enqueue", str(orig), "--schema", "clinical_note", "--batch", "b7"], medq_env).returncode == 0
    res = _cli(["enqueue", str(fixed), "--schema", "clinical_note", "--batch", "b7"], medq_env)
    assert res.returncode == 2
    assert res.stdout.strip() == "b7"  # the others were enqueued: a script still learns the batch
    assert "record 'a' is already in batch b7 with different text; the new text was NOT enqueued" in res.stderr
    assert "--replace" in res.stderr and "the other 2 record(s) were enqueued" in res.stderr
    assert "1 new, 1 already enqueued, 1 NOT enqueued (conflict)" in res.stderr
    assert "Age 41" not in res.stderr
    assert r.scard(batch_key("b7")) == 3
    assert not any(json.loads(r.get(k)).get("text") == "Age 41" for k in r.keys("medq:payload:*"))

    res = _cli(["enqueue", str(fixed), "--schema", "clinical_note", "--batch", "b7", "--replace"], medq_env)
    assert res.returncode == 0, res.stderr
    assert "0 new, 2 already enqueued, 1 replaced by a new revision" in res.stderr
    assert sorted(json.loads(r.get(k))["text"] for k in r.keys("medq:payload:*")) == ["Age 41", "note b", "note c"]

    res = _cli(["enqueue", str(fixed), "--schema", "clinical_note", "--batch", "b7", "--replace"], medq_env)
    assert res.returncode == 0 and "0 new, 3 already enqueued)" in res.stderr

    res = _cli(["enqueue", str(orig), "--schema", "clinical_note", "--batch", "b7"], medq_env)
    assert res.returncode == 2 and "record 'a' is already in batch b7" in res.stderr
    assert r.scard(batch_key("b7")) == 3
