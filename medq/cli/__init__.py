"""The ``medq`` command line (CONTRACT.md lists every command).

Exit codes: 0 done; 1 some jobs failed; 2 bad input or usage; 3 timed out waiting.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    help="medq: extract structured data from clinical notes with a local LLM, through Redis and Celery workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
llm_app = typer.Typer(help="Local OpenAI-compatible endpoints: the embedded model and the simulator.", no_args_is_help=True)
schemas_app = typer.Typer(help="The extraction schemas medq has loaded.", no_args_is_help=True)
app.add_typer(llm_app, name="llm")
app.add_typer(schemas_app, name="schemas")

out = Console()
err = Console(stderr=True)

# the embedded default, without importing medq.tools.local_model's dependencies for --help
DEFAULT_LOCAL_MODEL = "qwen2.5-coder-1.5b"

EXIT_FAILED_JOBS = 1
EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 3


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    # escaped: Rich reads any [word] as markup and drops it (it ate the "[local]" of an install hint)
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _settings():  # noqa: ANN202 - imported lazily so `medq --help` stays fast
    from medq.core.settings import get_settings

    return get_settings()


def _redis():  # noqa: ANN202
    import redis

    s = _settings()
    r = redis.Redis.from_url(s.redis_url)
    try:
        r.ping()
    except redis.ConnectionError:
        raise _fail(f"cannot reach Redis at {_safe_url(s.redis_url)} (MEDQ_REDIS_URL)") from None
    return r


def _safe_url(url: str) -> str:
    """The URL without its userinfo, for messages (one redaction for every URL shown)."""
    from medq.core.urls import redact_url

    return redact_url(url)


# ---------------------------------------------------------------- enqueue / status


@app.command()
def enqueue(
    path: str = typer.Argument(..., help="JSONL or CSV file, a folder of .txt files, or - for JSONL on stdin."),
    schema: str = typer.Option(..., "--schema", "-s", help="Extraction schema name (see `medq schemas list`)."),
    batch: Optional[str] = typer.Option(None, help="Batch id. Default: derived from the content, so re-running enqueues nothing twice."),
    wait: bool = typer.Option(False, "--wait", help="Show progress until every job has finished."),
    timeout_s: Optional[float] = typer.Option(None, "--timeout-s", help="With --wait: give up after this many seconds (exit 3)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Enqueue the good records even if some are bad."),
    fmt: Optional[str] = typer.Option(None, "--format", help="jsonl or csv; default: from the file extension."),
    replace: bool = typer.Option(False, "--replace", help="A record the batch already holds with different text runs "
                                 "again with the new text, as a new revision that replaces the old job and its result."),
) -> None:
    """Enqueue records for extraction; prints the batch id."""
    from medq.core.errors import InvalidBatchId, RedisFull, SchemaError, UnknownSchema
    from producer.enqueue import Producer, check_batch_id
    from producer.records import check, limits_of, read_path

    _redis()
    producer = Producer(_settings())
    try:
        if batch is not None:
            check_batch_id(batch)
        producer.schema_loader.get(schema)
    except (InvalidBatchId, SchemaError, UnknownSchema) as exc:
        raise _fail(exc.message) from None
    _warn_schema_problems(producer.schema_loader)
    try:
        checked = check(read_path(path, fmt), **limits_of(producer.settings))
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None
    if checked.problems:
        for p in checked.problems[:50]:
            err.print(f"[red]invalid[/red] {escape(str(p))}", highlight=False, soft_wrap=True)
        if len(checked.problems) > 50:
            err.print(f"... and {len(checked.problems) - 50} more", highlight=False)
        if not skip_invalid:
            raise _fail(f"{len(checked.problems)} invalid record(s); nothing was enqueued (use --skip-invalid to enqueue the rest)")
        err.print(f"skipping {len(checked.problems)} invalid record(s)", highlight=False)
    if not checked.records:
        raise _fail("no valid records to enqueue")
    try:
        result = producer.enqueue(checked, schema, batch, skip_invalid=True, replace=replace)  # problems were reported above
    except RedisFull as exc:
        raise _fail(exc.message) from None
    replaced = f", {len(result.replaced)} replaced by a new revision" if result.replaced else ""
    conflicts = f", {len(result.conflicts)} NOT enqueued (conflict)" if result.conflicts else ""
    err.print(
        f"batch {result.batch}: {len(result)} jobs ({result.created} new, {result.existing} already enqueued"
        f"{replaced}{conflicts})",
        highlight=False,
    )
    print(result.batch)
    if result.conflicts:
        raise _report_conflicts(result.batch, result.conflicts, len(result) - len(result.conflicts))
    if wait:
        _wait(producer.r, result.batch, timeout_s)


def _refuse_broken_schemas(producer, batch: str, all_failed: bool) -> None:
    """Jobs that would run again under a schema whose file is broken would only fail again: nothing is requeued."""
    from medq.state.jobs import REQUEUE_KINDS, failed

    loader = producer.schema_loader
    for st in failed(producer.r, batch):
        broken = loader.problem_for(st.schema)
        if (all_failed or st.error_kind in REQUEUE_KINDS) and broken and st.schema_version not in loader.versions(st.schema):
            raise _fail(f"nothing was requeued: the failed jobs of batch {batch} use schema {st.schema} version "
                        f"{st.schema_version}, which cannot be loaded: {broken.message}")


def _warn_schema_problems(loader) -> None:  # a medq.core.schemas.SchemaLoader, imported lazily
    """A bad schema file disables its own schema only; say so, since nobody may be watching a worker's log."""
    for problem in loader.problems:
        err.print(f"[yellow]warning:[/yellow] schema {escape(problem.name)} is not available: {escape(problem.message)}",
                  highlight=False, soft_wrap=True)


def _report_conflicts(batch: str, record_ids: list[str], others: int) -> typer.Exit:
    """A corrected record is never dropped quietly: each is named, with the way to run it."""
    for rid in record_ids[:50]:
        err.print(f"[red]conflict[/red] record {escape(repr(rid))} is already in batch {escape(batch)} with different "
                  "text; the new text was NOT enqueued", highlight=False, soft_wrap=True)
    if len(record_ids) > 50:
        err.print(f"... and {len(record_ids) - 50} more", highlight=False)
    return _fail(f"{len(record_ids)} record(s) conflict with batch {batch} (the other {others} record(s) were enqueued); "
                "to run the new text as a new revision of those records, replacing their results in the batch, "
                "run the same command again with --replace")


def _wait(r, batch: str, timeout_s: float | None) -> None:  # noqa: ANN001
    from medq.tools.progress import WaitTimeout, wait_for_batch

    try:
        c = wait_for_batch(r, batch, err, timeout_s)
    except WaitTimeout as exc:
        raise _fail(f"timed out after {timeout_s:g}s with {exc.unfinished} job(s) unfinished", EXIT_TIMEOUT) from None
    if c["failed"]:
        raise _fail(f"{c['failed']} job(s) failed; see `medq failed {batch}`", EXIT_FAILED_JOBS)


@app.command()
def status(
    batch: str = typer.Argument(..., help="Batch id printed by `medq enqueue`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Counts of jobs per state in a batch."""
    from medq.state.jobs import counts

    c = counts(_redis(), batch)
    total = sum(c.values())
    if total == 0:
        raise _fail(f"no jobs in batch {batch!r}")
    if as_json:
        print(json.dumps({"batch": batch, "total": total, **c}))
        return
    table = Table(title=f"batch {batch}")
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for state, n in c.items():
        table.add_row(state, str(n))
    table.add_row("[bold]total", f"[bold]{total}")
    out.print(table)


@app.command()
def results(
    batch: str = typer.Argument(..., help="Batch id."),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl or csv."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write to this file instead of stdout."),
    csv_data: str = typer.Option(
        "flat", "--csv-data",
        help="CSV only: flat (a column per extracted value: age, medications[0].name, ...) or json (one data column).",
    ),
) -> None:
    """Export a batch's results (CONTRACT format): one document per job."""
    from medq.core.errors import MedqError
    from medq.core.schemas import SchemaLoader
    from medq.state.results import open_store_for
    from medq.state.results.export import csv_lines, iter_results, to_jsonl

    if fmt not in ("jsonl", "csv"):
        raise _fail("--format must be jsonl or csv")
    if csv_data not in ("flat", "json"):
        raise _fail("--csv-data must be flat or json")
    r = _redis()
    s = _settings()
    store = open_store_for(s)
    fh = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
    n = 0
    try:
        if fmt == "csv":
            # flat reads the batch twice (the first pass sizes the list columns), never all of it at once
            lines = csv_lines(lambda: iter_results(r, store, batch), "flat" if csv_data == "flat" else "json",
                              SchemaLoader(s.schema_dirs) if csv_data == "flat" else None)
            fh.write(next(lines) + "\n")  # the header
        else:
            lines = (to_jsonl(doc) for doc in iter_results(r, store, batch))
        for line in lines:
            fh.write(line + "\n")
            n += 1
    except MedqError as exc:  # e.g. encrypted results and no key for them
        raise _fail(exc.message) from None
    finally:
        if output:
            fh.close()
        store.close()
    if n == 0:
        raise _fail(f"no jobs in batch {batch!r}")
    if output:
        err.print(f"wrote {n} results to {output}", highlight=False)


@app.command()
def failed(
    batch: str = typer.Argument(..., help="Batch id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines."),
) -> None:
    """Dead letters: the batch's failed jobs with their reason."""
    from medq.state.jobs import failed as failed_jobs

    rows = failed_jobs(_redis(), batch)
    if as_json:
        for st in rows:
            print(json.dumps({k: st.as_dict()[k] for k in ("record_id", "job_id", "error_kind", "error_message", "attempts", "deliveries")}))
        return
    if not rows:
        out.print(f"no failed jobs in batch {batch}")
        return
    table = Table(title=f"failed jobs in batch {batch}")
    for col in ("record", "kind", "attempts", "reason"):
        table.add_column(col)
    for st in rows:
        table.add_row(escape(st.record_id), st.error_kind or "", str(st.attempts), escape(st.error_message or ""))
    out.print(table)


@app.command()
def requeue(
    batch: str = typer.Argument(..., help="Batch id."),
    all_failed: bool = typer.Option(
        False, "--all-failed", help="Every failed job; default: only those that failed on endpoint errors."
    ),
) -> None:
    """Run failed jobs again."""
    from medq.state.jobs import requeue as requeue_jobs
    from producer.enqueue import Producer

    _redis()
    producer = Producer(_settings())
    _refuse_broken_schemas(producer, batch, all_failed)
    _warn_schema_problems(producer.schema_loader)
    report = requeue_jobs(producer, batch, all_failed=all_failed)
    err.print(f"requeued {len(report.requeued)} job(s)", highlight=False)
    if report.payload_missing:
        raise _fail(
            f"{len(report.payload_missing)} job(s) cannot run again, their stored record expired: "
            + ", ".join(report.payload_missing[:20])
        )


@app.command()
def purge(
    batch: str = typer.Argument(..., help="Batch id."),
    results_too: bool = typer.Option(
        False, "--results", help="Also delete the batch's results, in Redis or PostgreSQL (MEDQ_RESULTS_URL)."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a batch's records, job states and dead letters from Redis.

    Dead letters keep their record until the job succeeds or the batch is purged;
    this is how they go. Jobs still running store nothing afterwards. With --results,
    the batch's results go too, wherever MEDQ_RESULTS_URL keeps them."""
    from medq.state.jobs import purge as purge_batch

    r = _redis()
    if not yes and not typer.confirm(f"delete batch {batch}'s records and job states from Redis?"):
        raise typer.Exit(EXIT_BAD_INPUT)
    report = purge_batch(r, batch, results=results_too)
    s = _settings()
    if results_too and s.effective_results_url != s.redis_url:
        # After the job states: a run finishing from now on finds its job gone and takes
        # its own result back (worker.jobs._forget_purged), so none outlives this.
        from medq.state.results import open_store_for

        store = open_store_for(s)
        try:
            report.results += store.delete(report.job_ids) + store.delete_batch(batch)
        finally:
            store.close()
    err.print(
        f"purged batch {batch}: {report.jobs} job state(s), {report.payloads} record(s)"
        + (f", {report.results} result(s)" if results_too else ""),
        highlight=False,
    )


@app.command()
def endpoints(as_json: bool = typer.Option(False, "--json", help="Print JSON lines.")) -> None:
    """The configured endpoints as the workers share them: adaptive in-flight cap,
    requests in flight, cool-down, successes and errors; and whether each serves its
    model (ok, not served, unreachable), checked now as a starting worker does."""
    from worker.llm.model_check import check_models
    from medq.state.endpoints import endpoint_snapshots

    r = _redis()
    s = _settings()
    rows = endpoint_snapshots(r, [ep.url for ep in s.llm.all_endpoints], s.llm.max_in_flight)
    checks = check_models(s)
    if as_json:
        for row, check in zip(rows, checks):
            print(json.dumps({**row, "model": check.as_dict()}))
        return
    table = Table(title="endpoints")
    for col in ("url", "model", "in flight", "cap", "cooling (s)", "ok", "errors", "cap cuts", "latency cuts",
                "cool-downs"):
        table.add_column(col)
    for row, check in zip(rows, checks):
        table.add_row(
            row["url"], escape(f"{check.model}: {check.summary()}"), str(row["in_flight"]), f"{row['limit']:g}",
            f"{row['cooling_s']:g}", str(row["ok"]), str(row["errors"]), str(row["cuts"]), str(row["latency_cuts"]),
            str(row["trips"]),
        )
    out.print(table)


def _read_gold(path: Path) -> dict[str, Any]:
    """A gold file (JSONL of {"id", "data"}) by record id; a clear error if it cannot be read."""
    from medq.tools.evaluate import records_by_id

    try:
        return records_by_id(path.read_text(encoding="utf-8").splitlines())
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise _fail(f"{path}: {exc}") from None


@app.command("eval")
def eval_(
    batch: str = typer.Argument(..., help="Batch id."),
    gold: Path = typer.Option(..., "--gold", help='Gold labels: JSONL of {"id", "data"} per record.'),
    schema: Optional[str] = typer.Option(None, "--schema", help="Default: the batch's schema."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Per-field scores of a batch against gold labels: accuracy, precision / recall / F1, macro."""
    from medq.core.errors import SchemaVersionUnavailable, UnknownSchema
    from medq.tools.evaluate import evaluate
    from medq.tools.report import score_table
    from medq.core.schemas import SchemaLoader
    from medq.state.results import open_store_for
    from medq.state.results.export import iter_results

    r = _redis()
    s = _settings()
    store = open_store_for(s)
    try:
        docs = list(iter_results(r, store, batch))
    finally:
        store.close()
    if not docs:
        raise _fail(f"no jobs in batch {batch!r}")
    golds = _read_gold(gold)
    try:
        # the batch's own version unless another schema is named
        sch = SchemaLoader(s.schema_dirs).get(schema or docs[0]["schema"], None if schema else docs[0].get("schema_version"))
    except (UnknownSchema, SchemaVersionUnavailable) as exc:
        raise _fail(exc.message) from None
    unfinished = sum(d["status"] not in ("succeeded", "failed") for d in docs)
    report = evaluate(sch, {d["id"]: d["data"] for d in docs}, {k: v for k, v in golds.items() if v is not None})
    if as_json:
        print(json.dumps(report.as_dict(), ensure_ascii=False))
    else:
        out.print(score_table(report))
    if unfinished:
        err.print(f"note: {unfinished} job(s) have not finished; they count as failed", highlight=False)


@app.command()
def review(
    batch: str = typer.Argument(..., help="Batch id."),
    output: Path = typer.Option(Path("review.html"), "-o", "--output",
                                help="The page to write (mode 0600). It shows the notes: it is PHI, keep it where they may be kept."),
    notes: Optional[Path] = typer.Option(
        None, "--notes",
        help="The JSONL, CSV or folder the batch was enqueued from: the notes of jobs that succeeded "
             "(their stored record is deleted then), matched by record id.",
    ),
    gold: Optional[Path] = typer.Option(None, "--gold", help='Gold labels (JSONL of {"id", "data"}): mark each value right or wrong.'),
) -> None:
    """One self-contained HTML page (nothing fetched over the network) showing each note with the
    evidence of every extracted value highlighted, the extraction beside it, values without
    evidence marked and, with --gold, each value right or wrong. The page holds PHI."""
    from medq.core.crypto import Sealer
    from medq.core.errors import MedqError
    from medq.tools.review import build, find_notes, read_notes, write_private
    from medq.core.schemas import SchemaLoader
    from producer.records import limits_of
    from medq.state.results import open_store_for
    from medq.state.results.export import iter_results

    r = _redis()
    s = _settings()
    store = open_store_for(s)
    try:
        docs = list(iter_results(r, store, batch))
    except MedqError as exc:  # e.g. encrypted results and no key for them
        raise _fail(exc.message) from None
    finally:
        store.close()
    if not docs:
        raise _fail(f"no jobs in batch {batch!r}")
    records: dict[str, Any] = {}
    unread = 0
    if notes is not None:
        try:
            records, unread = read_notes(notes, limits_of(s))
        except OSError as exc:  # FileNotFoundError says which path itself
            raise _fail(str(exc) if isinstance(exc, FileNotFoundError) else f"cannot read {notes}: {exc.strerror}") from None
    golds = None
    if gold is not None:
        golds = _read_gold(gold)
    loader = SchemaLoader(s.schema_dirs)
    schemas = {}
    for name, version in {(str(d["schema"]), int(d.get("schema_version") or 0)) for d in docs}:
        try:
            schemas[(name, version)] = loader.get(name, version or None).json_schema
        except MedqError:
            pass  # list items are then matched on their first string value
    try:
        page = build(batch, docs, find_notes(r, docs, records, Sealer.from_settings(s)), golds, schemas)
        write_private(output, page)
    except MedqError as exc:
        raise _fail(exc.message) from None
    except OSError as exc:
        raise _fail(f"cannot write {output}: {exc.strerror}") from None
    if unread:
        err.print(f"note: {unread} record(s) of {notes} could not be read and are not matched", highlight=False)
    err.print(f"wrote the review of {len(docs)} record(s) to {escape(str(output))} (mode 0600; it shows the notes: PHI)",
              highlight=False)


@app.command()
def demo(
    model: str = typer.Option(DEFAULT_LOCAL_MODEL, "--model", "-m", help="Embedded model: qwen2.5-coder-1.5b (default), qwen2.5-coder-0.5b, gemma3-270m, smollm2 (fastest, lowest score), or a .gguf path."),
    schema: str = typer.Option("clinical_note", "--schema", help="Which bundled samples: clinical_note or discharge_summary."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N sample records."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Use this running OpenAI-compatible server (…/v1) instead of starting the embedded one."),
    endpoint_model: Optional[str] = typer.Option(None, "--endpoint-model", help="Model name to send with --endpoint (default MEDQ_LLM__MODEL)."),
    concurrency: int = typer.Option(1, "-c", "--concurrency", help="Requests in flight to the model (the embedded server answers one at a time)."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="single or fields (default: what scored best for the model)."),
    grounding: Optional[str] = typer.Option(None, "--grounding", help="flag or drop values not found in the note."),
    few_shot: Optional[bool] = typer.Option(None, "--few-shot/--no-few-shot", help="Show the schema's examples to the model."),
    timeout_s: Optional[float] = typer.Option(None, "--timeout-s", help="Give up after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of tables."),
) -> None:
    """The main job on the embedded model: start what is missing, extract the bundled samples, score them, stop."""
    from medq.tools.demo import DemoError, DemoOptions, run_demo

    if strategy not in (None, "single", "fields"):
        raise _fail("--strategy must be single or fields")
    if grounding not in (None, "flag", "drop"):
        raise _fail("--grounding must be flag or drop")
    opts = DemoOptions(model=model, schema=schema, limit=limit, endpoint=endpoint, endpoint_model=endpoint_model,
                       concurrency=concurrency, strategy=strategy, grounding=grounding, few_shot=few_shot,
                       timeout_s=timeout_s, as_json=as_json)
    try:
        # Jobs that fail (a tiny model's answer may never validate) are shown in the
        # tables and scored as wrong; the demo itself succeeded if it got that far.
        run_demo(opts, err if as_json else out)
    except DemoError as exc:
        raise _fail(str(exc), 1) from None
    except KeyboardInterrupt:
        err.print("interrupted; everything the demo started has been stopped", highlight=False)
        raise typer.Exit(130) from None


@app.command()
def bench(
    jobs: int = typer.Option(2000, "--jobs", "-n", help="Jobs per phase."),
    latency_ms: float = typer.Option(200.0, "--latency-ms", help="Simulator latency per request."),
    parallel: int = typer.Option(64, "--parallel", help="Requests in flight: the simulator's and the workers' (MAX_IN_FLIGHT)."),
    workers: int = typer.Option(1, "--workers", help="Worker processes on this node."),
    concurrency: Optional[int] = typer.Option(None, "-c", "--concurrency", help="Task messages per worker process (default: enough for 2 x parallel jobs)."),
    pool: str = typer.Option("threads", "--pool", "-P", help="Celery pool of the workers."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Measure this OpenAI-compatible server instead of the simulator."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name to send to --endpoint."),
    overhead_jobs: Optional[int] = typer.Option(None, "--overhead-jobs", help="Jobs for the latency-0 phase (default: --jobs)."),
    no_overhead: bool = typer.Option(False, "--no-overhead", help="Skip the latency-0 phase."),
    as_json: bool = typer.Option(False, "--json", help="Print the measurements as JSON."),
) -> None:
    """Throughput through the real system against a direct client, measured side by side.

    Prints ceiling (direct asyncio client), medq (producer -> Redis -> workers ->
    endpoint -> results), utilisation = medq / ceiling, the latency-0 overhead phase
    with CPU ms per job, and p50/p95 latency per job."""
    from medq.tools.bench import Bench, BenchOptions, report_table
    from medq.tools.processes import DemoError

    opts = BenchOptions(jobs=jobs, latency_ms=latency_ms, parallel=parallel, workers=workers, concurrency=concurrency,
                        pool=pool, endpoint=endpoint, model=model, overhead_jobs=overhead_jobs, skip_overhead=no_overhead)
    try:
        res = Bench(opts, err).run()
    except DemoError as exc:
        raise _fail(str(exc), 1) from None
    except KeyboardInterrupt:
        err.print("interrupted; everything the bench started has been stopped", highlight=False)
        raise typer.Exit(130) from None
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        out.print(report_table(res))


# ---------------------------------------------------------------- schemas


@schemas_app.command("list")
def schemas_list() -> None:
    """The schemas found in medq's configs/schemas, ./configs/schemas and MEDQ_SCHEMAS_DIRS, every loaded version;
    files that cannot be loaded are listed as problems (exit 2)."""
    from medq.core.schemas import SchemaLoader

    loader = SchemaLoader(_settings().schema_dirs)
    table = Table()
    for col in ("name", "version", "fields", "description"):
        table.add_column(col)
    for sch in loader.all_versions():
        table.add_row(sch.name, str(sch.version), ", ".join(sch.field_names), escape(sch.description))
    out.print(table)
    for problem in loader.problems:  # on stderr, with exit 2: a check in CI sees them
        err.print(f"[red]problem[/red] schema {escape(problem.name)}: {escape(problem.message)}",
                  highlight=False, soft_wrap=True)
    if loader.problems:
        raise typer.Exit(EXIT_BAD_INPUT)


@schemas_app.command("show")
def schemas_show(
    name: str = typer.Argument(..., help="Schema name."),
    version: Optional[int] = typer.Option(None, "--version", help="A loaded version (default: the newest)."),
) -> None:
    """A schema as the JSON Schema sent to the model."""
    from medq.core.errors import SchemaError, SchemaVersionUnavailable, UnknownSchema
    from medq.core.schemas import SchemaLoader

    try:
        sch = SchemaLoader(_settings().schema_dirs).get(name, version)
    except (SchemaError, UnknownSchema, SchemaVersionUnavailable) as exc:
        raise _fail(exc.message) from None
    print(json.dumps(
        {"name": sch.name, "version": sch.version, "description": sch.description,
         "instructions": sch.instructions, "json_schema": sch.json_schema},
        indent=2, ensure_ascii=False,
    ))


# ---------------------------------------------------------------- worker


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    concurrency: Optional[int] = typer.Option(
        None, "-c", "--concurrency",
        help="Task messages at once (default MEDQ_WORKER__CONCURRENCY); each carries up to MEDQ_JOBS_PER_MESSAGE jobs. "
             "Requests in flight are capped by MEDQ_LLM__MAX_IN_FLIGHT.",
    ),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l", help="Log level."),
    pool: Optional[str] = typer.Option(None, "--pool", "-P", help="threads (default), prefork or solo."),
) -> None:
    """A Celery worker bound to the configured endpoint(s). Options after -- go to `celery worker`."""
    s = _settings()
    args = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", "medq",
        "-P", pool or s.worker.pool,
        "-c", str(concurrency or s.worker.concurrency),
        "--loglevel", loglevel,
        # Unique per process, so several workers on one host do not collide.
        "-n", f"medq-{os.getpid()}@%h",
        *ctx.args,
    ]
    sys.stdout.flush()
    os.execv(sys.executable, args)


# ---------------------------------------------------------------- keys


@app.command()
def keygen() -> None:
    """Print a new key for MEDQ_ENCRYPTION_KEY (Fernet). To rotate, put the new key first
    and keep the old one after it, comma-separated, until its data has expired."""
    from cryptography.fernet import Fernet

    out.print(Fernet.generate_key().decode(), highlight=False)


# ---------------------------------------------------------------- metrics


@app.command()
def metrics(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(9808, "--port", help="Port to listen on."),
) -> None:
    """Serve medq's metrics for Prometheus at /metrics: jobs by schema and outcome, LLM latency,
    tokens, re-asks, truncations, rate-limit waits, queue length, in flight per endpoint."""
    import signal

    from prometheus_client import start_http_server

    from medq.tools.metrics_server import registry_for

    start_http_server(port, addr=host, registry=registry_for(_settings()))
    err.print(f"medq metrics on http://{host}:{port}/metrics", highlight=False)
    signal.pause()


# ---------------------------------------------------------------- flower


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def flower(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Basic auth over plain HTTP: keep it on "
                             "loopback and reach it through an SSH tunnel or a TLS proxy."),
    port: int = typer.Option(5555, "--port", help="Port to listen on."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth",
                                          help="Run without a login (anyone who reaches the port sees the queue)."),
) -> None:
    """Flower for the medq queue, with basic auth from MEDQ_FLOWER__USER / MEDQ_FLOWER__PASSWORD
    and Prometheus metrics at /metrics. Options after -- go to `celery flower`."""
    s = _settings()
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    user, password = s.flower.user, s.flower.password.get_secret_value() if s.flower.password else None
    if user and password:
        if any(c in f"{user}{password}" for c in ",\n") or ":" in user:
            raise _fail("MEDQ_FLOWER__USER must not contain ':' or ',' and MEDQ_FLOWER__PASSWORD not ',' (Flower splits on them)")
        env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"  # in the environment, not on the command line (ps)
    elif not insecure_no_auth:
        raise _fail(
            "Flower shows job ids, record ids and error reasons, and can revoke tasks: set MEDQ_FLOWER__USER and "
            "MEDQ_FLOWER__PASSWORD, or pass --insecure-no-auth to run it without a login"
        )
    else:
        err.print("[yellow]warning:[/yellow] Flower without a login (--insecure-no-auth)", highlight=False)
        env["FLOWER_UNAUTHENTICATED_API"] = "true"  # open means the API too (Flower closes it by default)
    args = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower", f"--address={host}", f"--port={port}", *ctx.args]
    sys.stdout.flush()
    os.execve(sys.executable, args, env)


# ---------------------------------------------------------------- api


@app.command()
def api(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Tokens travel in plain HTTP: keep it on "
                             "loopback or a private network, or put a TLS proxy in front."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth",
                                          help="Run without tokens when MEDQ_API__TOKENS is empty (anyone who reaches "
                                               "the port can enqueue and read)."),
) -> None:
    """The HTTP service for other services: enqueue records and batches, read states and results.
    Bearer tokens from MEDQ_API__TOKENS (CLIENT:TOKEN, comma-separated); OpenAPI at /docs and /openapi.json."""
    import logging

    from medq.api.app import create_app
    from medq.api.server import serve
    from medq.core.errors import SchemaError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        application = create_app(_settings(), insecure_no_auth=insecure_no_auth)
    except (ValueError, SchemaError) as exc:
        raise _fail(str(exc)) from None
    if application.state.token_digests is None:
        err.print("[yellow]warning:[/yellow] medq api without tokens (--insecure-no-auth)", highlight=False)
    serve(application, host, port, _settings())  # uvicorn, with time limits on slow clients


# ---------------------------------------------------------------- llm


@llm_app.command("serve")
def llm_serve(
    model: str = typer.Option(DEFAULT_LOCAL_MODEL, "--model", "-m",
                              help="gemma3-270m, smollm2, qwen2.5-coder-1.5b, qwen2.5-coder-0.5b (their parts installed "
                                   "by name, see README), or a path to a .gguf file."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (keep it on loopback or a private network)."),
    port: int = typer.Option(8080, help="Port to listen on."),
    n_ctx: int = typer.Option(4096, "--n-ctx", help="Context window in tokens."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
) -> None:
    """The embedded local model: llama.cpp's OpenAI-compatible server over a GGUF from a PyPI package."""
    from medq.tools.local_model import LocalModelError, check_server_installed, resolve, server_command

    try:
        check_server_installed()
        local = resolve(model)
    except LocalModelError as exc:
        raise _fail(str(exc)) from None
    err.print(
        f"serving {local.name} ({local.path}) at http://{host}:{port}/v1\n"
        f"point workers at it: MEDQ_LLM__BASE_URL=http://{host}:{port}/v1 MEDQ_LLM__MODEL={local.name} "
        f"MEDQ_LLM__CONTEXT_TOKENS={n_ctx} MEDQ_LLM__MAX_IN_FLIGHT=1\n"
        f"(it works on one request at a time, and does not tell its context: the settings do)",
        highlight=False,
    )
    cmd = server_command(local, host, port, n_ctx=n_ctx, n_threads=threads)
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


@llm_app.command("simulate")
def llm_simulate(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8090, help="Port to listen on."),
    latency_ms: float = typer.Option(0.0, "--latency-ms", help="Time each request takes once it is served."),
    parallel: int = typer.Option(64, help="Requests served at once; the rest wait, as in a batching server."),
    fault: str = typer.Option("", help="Faults as KIND:RATE,... Kinds: 429, 500, 503, timeout, malformed, truncated, invalid, invented, runaway."),
    seed: Optional[int] = typer.Option(None, help="Random seed for reproducible faults."),
    reject_json_schema: bool = typer.Option(
        False, help="Refuse response_format json_schema (HTTP 500, as llama-cpp-python's server does)."
    ),
    dialect: str = typer.Option(
        "openai", help="openai, or tgi: take only TGI's response_format (type json + value), refuse others with TGI's 422."
    ),
    served_model: Optional[list[str]] = typer.Option(
        None, "--served-model", help="Serve only these models (repeat, or comma-separated): /v1/models lists them and "
        "a request for another gets Ollama's 404 'model not found'. Default: any model name is taken.",
    ),
    context_tokens: Optional[int] = typer.Option(
        None, "--context-tokens", min=1, help="Cut longer prompts to this many tokens without an error and report that "
        "many prompt tokens, as Ollama does with its default context (see --context-overflow).",
    ),
    context_overflow: str = typer.Option(
        "cut", "--context-overflow", help="What a prompt longer than --context-tokens gets: cut (silently, as Ollama) "
        "or refuse (HTTP 400 exceed_context_size_error with n_ctx, as llama.cpp's server; the prompt alone is compared).",
    ),
    advertise_context: bool = typer.Option(
        False, "--advertise-context", help="Say the limits: GET /props as llama.cpp's server (n_ctx, total_slots = "
        "--parallel) and max_model_len in /v1/models as vLLM. Default: /props is 404 and models carry no size, as Ollama.",
    ),
) -> None:
    """An OpenAI-compatible endpoint that answers schema-valid JSON without a model (load and fault tests)."""
    from medq.tools.simulator import serve

    serve(
        host=host,
        port=port,
        latency_ms=latency_ms,
        parallel=parallel,
        faults=fault,
        seed=seed,
        reject_json_schema=reject_json_schema,
        dialect=dialect,
        served_models=tuple(name.strip() for names in served_model or [] for name in names.split(",") if name.strip()),
        context_tokens=context_tokens,
        context_overflow=context_overflow,
        advertise_context=advertise_context,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
