"""`medq enqueue`, `status`, `results`, `failed`, `requeue`, `purge`: a batch's jobs, from records to results.

All of the base install: a producer needs nothing else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import redis
import typer
from rich.markup import escape
from rich.table import Table

from medq.cli.common import EXIT_BAD_INPUT, EXIT_FAILED_JOBS, EXIT_GONE, EXIT_TIMEOUT, connect_redis, err, fail, out
from medq.core.errors import BatchGone, InvalidBatchId, MedqError, RedisFull, SchemaError, UnknownSchema, WaitTimeout
from medq.core.schemas import SchemaLoader
from medq.core.settings import get_settings
from medq.state.jobs import REQUEUE_KINDS, counts
from medq.state.jobs import failed as failed_jobs
from medq.state.jobs import purge as purge_batch
from medq.state.jobs import requeue as requeue_jobs
from medq.state.persistence import restart_note, server_life
from medq.state.results import open_store_for
from medq.state.results.export import csv_lines, iter_results, to_jsonl
from medq.tools.progress import wait_for_batch
from producer.enqueue import Producer, check_batch_id
from producer.records import check, limits_of, read_path

app = typer.Typer()


@app.command()
def enqueue(
    path: str = typer.Argument(..., help="JSONL or CSV file, a folder of .txt files, or - for JSONL on stdin."),
    schema: str = typer.Option(..., "--schema", "-s", help="Extraction schema name (see `medq schemas list`)."),
    batch: str | None = typer.Option(None, help="Batch id. Default: derived from the content, so re-running enqueues nothing twice."),
    wait: bool = typer.Option(False, "--wait", help="Show progress until every job has finished."),
    timeout_s: float | None = typer.Option(None, "--timeout-s", help="With --wait: give up after this many seconds (exit 3)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Enqueue the good records even if some are bad."),
    fmt: str | None = typer.Option(None, "--format", help="jsonl or csv; default: from the file extension."),
    replace: bool = typer.Option(False, "--replace", help="A record the batch already holds with different text runs "
                                 "again with the new text, as a new revision that replaces the old job and its result."),
) -> None:
    """Enqueue records for extraction; prints the batch id."""
    connect_redis()
    producer = Producer(get_settings())
    try:
        if batch is not None:
            check_batch_id(batch)
        producer.schema_loader.get(schema)
    except (InvalidBatchId, SchemaError, UnknownSchema) as exc:
        raise fail(exc.message) from None
    _warn_schema_problems(producer.schema_loader)
    try:
        checked = check(read_path(path, fmt), **limits_of(producer.settings))
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    if checked.problems:
        for p in checked.problems[:50]:
            err.print(f"[red]invalid[/red] {escape(str(p))}", highlight=False, soft_wrap=True)
        if len(checked.problems) > 50:
            err.print(f"... and {len(checked.problems) - 50} more", highlight=False)
        if not skip_invalid:
            raise fail(f"{len(checked.problems)} invalid record(s); nothing was enqueued (use --skip-invalid to enqueue the rest)")
        err.print(f"skipping {len(checked.problems)} invalid record(s)", highlight=False)
    if not checked.records:
        raise fail("no valid records to enqueue")
    try:
        result = producer.enqueue(checked, schema, batch, skip_invalid=True, replace=replace)  # problems were reported above
    except RedisFull as exc:
        raise fail(exc.message) from None
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
        _wait(producer.r, result.batch, timeout_s, expected=len(result))


def _refuse_broken_schemas(producer: Producer, batch: str, all_failed: bool) -> None:
    """Jobs that would run again under a schema whose file is broken would only fail again: nothing is requeued."""
    loader = producer.schema_loader
    for st in failed_jobs(producer.r, batch):
        broken = loader.problem_for(st.schema)
        if (all_failed or st.error_kind in REQUEUE_KINDS) and broken and st.schema_version not in loader.versions(st.schema):
            raise fail(f"nothing was requeued: the failed jobs of batch {batch} use schema {st.schema} version "
                       f"{st.schema_version}, which cannot be loaded: {broken.message}")


def _warn_schema_problems(loader: SchemaLoader) -> None:
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
    return fail(f"{len(record_ids)} record(s) conflict with batch {batch} (the other {others} record(s) were enqueued); "
                "to run the new text as a new revision of those records, replacing their results in the batch, "
                "run the same command again with --replace")


def _wait(r: redis.Redis, batch: str, timeout_s: float | None, expected: int) -> None:
    """`enqueue --wait`: progress until the batch is done; exit 1 if jobs failed, 3 on the time
    limit, 4 if the job states vanished (a Redis restarted without persistence, a purge)."""
    try:
        c = wait_for_batch(r, batch, err, timeout_s, expected=expected)
    except WaitTimeout as exc:
        raise fail(f"timed out after {timeout_s:g}s with {exc.unfinished} job(s) unfinished", EXIT_TIMEOUT) from None
    except BatchGone as exc:
        raise fail(exc.message, EXIT_GONE) from None
    if c["failed"]:
        raise fail(f"{c['failed']} job(s) failed; see `medq failed {batch}`", EXIT_FAILED_JOBS)


def _no_jobs(r: redis.Redis, batch: str) -> typer.Exit:
    """A batch without job states: never enqueued here, or its states are gone; which of the
    two, medq cannot tell afterwards, so the message names both, with what Redis says of itself."""
    return fail(BatchGone(batch, note=restart_note(server_life(r))).message)


@app.command()
def status(
    batch: str = typer.Argument(..., help="Batch id printed by `medq enqueue`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Counts of jobs per state in a batch."""
    r = connect_redis()
    c = counts(r, batch)
    total = sum(c.values())
    if total == 0:
        raise _no_jobs(r, batch)
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
    output: Path | None = typer.Option(None, "-o", "--output", help="Write to this file instead of stdout."),
    csv_data: str = typer.Option(
        "flat", "--csv-data",
        help="CSV only: flat (a column per extracted value: age, medications[0].name, ...) or json (one data column).",
    ),
) -> None:
    """Export a batch's results (CONTRACT format): one document per job."""
    if fmt not in ("jsonl", "csv"):
        raise fail("--format must be jsonl or csv")
    if csv_data not in ("flat", "json"):
        raise fail("--csv-data must be flat or json")
    r = connect_redis()
    s = get_settings()
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
        raise fail(exc.message) from None
    finally:
        if output:
            fh.close()
        store.close()
    if n == 0:
        raise _no_jobs(r, batch)
    if output:
        err.print(f"wrote {n} results to {output}", highlight=False)


@app.command()
def failed(
    batch: str = typer.Argument(..., help="Batch id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines."),
) -> None:
    """Dead letters: the batch's failed jobs with their reason."""
    rows = failed_jobs(connect_redis(), batch)
    if as_json:
        for st in rows:
            fields = ("record_id", "job_id", "error_kind", "error_message", "attempts", "deliveries")
            print(json.dumps({k: st.as_dict()[k] for k in fields}))
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
        False, "--all-failed", help="Every failed job; default: only those that failed on endpoint errors, "
                                    "or for want of a worker with their schema version once one is running."
    ),
) -> None:
    """Run failed jobs again."""
    connect_redis()
    producer = Producer(get_settings())
    _refuse_broken_schemas(producer, batch, all_failed)
    _warn_schema_problems(producer.schema_loader)
    report = requeue_jobs(producer, batch, all_failed=all_failed)
    err.print(f"requeued {len(report.requeued)} job(s)", highlight=False)
    for (schema, version), n in sorted(report.no_worker.items()):
        err.print(f"[yellow]not requeued:[/yellow] {n} job(s) of schema {escape(schema)} version {version}: no live "
                  f"worker has that version loaded. Start a worker whose schema folders hold it (e.g. "
                  f"{escape(schema)}.v{version}.yaml in MEDQ_SCHEMAS_DIRS), then run `medq requeue {escape(batch)}` "
                  "again", highlight=False, soft_wrap=True)
    if report.payload_missing:
        raise fail(
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
    r = connect_redis()
    if not yes and not typer.confirm(f"delete batch {batch}'s records and job states from Redis?"):
        raise typer.Exit(EXIT_BAD_INPUT)
    report = purge_batch(r, batch, results=results_too)
    s = get_settings()
    if results_too and s.effective_results_url != s.redis_url:
        # After the job states: a run finishing from now on finds its job gone and takes
        # its own result back (worker.runner.JobRunner._forget_purged), so none outlives this.
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
