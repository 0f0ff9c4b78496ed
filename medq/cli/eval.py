"""`medq eval`: a batch's results scored against gold labels."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from medq.cli.common import connect_redis, err, fail, out, read_gold
from medq.core.errors import SchemaVersionUnavailable, UnknownSchema
from medq.core.schemas import SchemaLoader
from medq.core.settings import get_settings
from medq.state.results import open_store_for
from medq.state.results.export import iter_results
from medq.tools.evaluate import evaluate
from medq.tools.report import score_table

app = typer.Typer()


@app.command("eval")
def eval_(
    batch: str = typer.Argument(..., help="Batch id."),
    gold: Path = typer.Option(..., "--gold", help='Gold labels: JSONL of {"id", "data"} per record.'),
    schema: str | None = typer.Option(None, "--schema", help="Default: the batch's schema."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Per-field scores of a batch against gold labels: accuracy, precision / recall / F1, macro."""
    r = connect_redis()
    s = get_settings()
    store = open_store_for(s)
    try:
        docs = list(iter_results(r, store, batch))
    finally:
        store.close()
    if not docs:
        raise fail(f"no jobs in batch {batch!r}")
    golds = read_gold(gold)
    try:
        # the batch's own version unless another schema is named
        sch = SchemaLoader(s.schema_dirs).get(schema or docs[0]["schema"], None if schema else docs[0].get("schema_version"))
    except (UnknownSchema, SchemaVersionUnavailable) as exc:
        raise fail(exc.message) from None
    unfinished = sum(d["status"] not in ("succeeded", "failed") for d in docs)
    report = evaluate(sch, {d["id"]: d["data"] for d in docs}, {k: v for k, v in golds.items() if v is not None})
    if as_json:
        print(json.dumps(report.as_dict(), ensure_ascii=False))
    else:
        out.print(score_table(report))
    if unfinished:
        err.print(f"note: {unfinished} job(s) have not finished; they count as failed", highlight=False)
