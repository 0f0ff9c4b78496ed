"""`medq review`: one HTML page to check a batch's extractions against their notes by eye."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from medq.cli.common import connect_redis, err, fail, read_gold
from medq.core.crypto import Sealer
from medq.core.errors import MedqError
from medq.core.schemas import SchemaLoader
from medq.core.settings import get_settings
from medq.state.results import open_store_for
from medq.state.results.export import iter_results
from medq.tools.review import build, find_notes, read_notes, write_private
from producer.records import limits_of

app = typer.Typer()


@app.command()
def review(
    batch: str = typer.Argument(..., help="Batch id."),
    output: Path = typer.Option(Path("review.html"), "-o", "--output",
                                help="The page to write (mode 0600). It shows the notes: it is PHI, keep it where they may be kept."),
    notes: Path | None = typer.Option(
        None, "--notes",
        help="The JSONL, CSV or folder the batch was enqueued from: the notes of jobs that succeeded "
             "(their stored record is deleted then), matched by record id.",
    ),
    gold: Path | None = typer.Option(None, "--gold", help='Gold labels (JSONL of {"id", "data"}): mark each value right or wrong.'),
) -> None:
    """One self-contained HTML page (nothing fetched over the network) showing each note with the
    evidence of every extracted value highlighted, the extraction beside it, values without
    evidence marked and, with --gold, each value right or wrong. The page holds PHI."""
    r = connect_redis()
    s = get_settings()
    store = open_store_for(s)
    try:
        docs = list(iter_results(r, store, batch))
    except MedqError as exc:  # e.g. encrypted results and no key for them
        raise fail(exc.message) from None
    finally:
        store.close()
    if not docs:
        raise fail(f"no jobs in batch {batch!r}")
    records: dict[str, Any] = {}
    unread = 0
    if notes is not None:
        try:
            records, unread = read_notes(notes, limits_of(s))
        except OSError as exc:  # FileNotFoundError says which path itself
            raise fail(str(exc) if isinstance(exc, FileNotFoundError) else f"cannot read {notes}: {exc.strerror}") from None
    golds = None
    if gold is not None:
        golds = read_gold(gold)
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
        raise fail(exc.message) from None
    except OSError as exc:
        raise fail(f"cannot write {output}: {exc.strerror}") from None
    if unread:
        err.print(f"note: {unread} record(s) of {notes} could not be read and are not matched", highlight=False)
    err.print(f"wrote the review of {len(docs)} record(s) to {escape(str(output))} (mode 0600; it shows the notes: PHI)",
              highlight=False)
