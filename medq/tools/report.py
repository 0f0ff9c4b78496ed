"""Tables for the terminal: a batch's extractions and its per-field scores."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from rich.markup import escape
from rich.table import Table

from medq.tools.evaluate import Report, ScoreKind


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def score_table(report: Report) -> Table:
    """Per-field scores, then the macro score."""
    table = Table(title=f"scores against gold labels: {report.schema} v{report.schema_version}")
    for col, justify in (("field", "left"), ("n", "right"), ("accuracy", "right"), ("precision", "right"),
                         ("recall", "right"), ("F1", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in report.rows:
        if row.kind is ScoreKind.ACCURACY:
            table.add_row(row.field, str(row.n), _pct(row.accuracy), "", "", "")
        else:
            table.add_row(row.field, str(row.n), "", _pct(row.precision), _pct(row.recall), _pct(row.f1))
    table.add_section()
    table.add_row(
        "[bold]macro", str(report.records), "", "", "", f"[bold]{_pct(report.macro)}",
    )
    table.caption = (
        f"{report.records} records: {report.succeeded} extracted, {report.failed} failed, {report.missing} missing. "
        "macro = mean over rows of accuracy (scalars) or F1 (lists); counts are micro-averaged."
    )
    return table


def _short(value: Any, width: int = 40) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        items = [v.get("name", json.dumps(v, ensure_ascii=False)) if isinstance(v, dict) else str(v) for v in value]
        text = ", ".join(items) if items else "[]"
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) or "-"
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def results_table(docs: Iterable[dict[str, Any]], fields: list[str], max_fields: int = 5) -> Table:
    """One row per job: record id, status, the first fields in short, seconds."""
    shown = fields[:max_fields]
    table = Table(title="extractions")
    table.add_column("record")
    table.add_column("status")
    for f in shown:
        table.add_column(f)
    table.add_column("s", justify="right")
    for doc in docs:
        data = doc.get("data") or {}
        status = doc["status"] if doc["status"] != "failed" else f"[red]failed: {(doc.get('error') or {}).get('kind')}[/red]"
        latency = doc.get("latency_ms")
        table.add_row(
            escape(doc["id"]), status, *[escape(_short(data.get(f))) for f in shown],
            f"{latency / 1000:.1f}" if latency else "-",
        )
    return table
