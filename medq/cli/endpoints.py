"""`medq endpoints`: the LLM endpoints as the workers share them, and whether each serves its model."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from medq.cli.common import connect_redis, out
from medq.core.settings import get_settings
from medq.state.endpoints import GateConfig, endpoint_snapshots

app = typer.Typer()


@app.command()
def endpoints(as_json: bool = typer.Option(False, "--json", help="Print JSON lines.")) -> None:
    """The configured endpoints as the workers share them: adaptive in-flight cap,
    requests in flight, cool-down, successes and errors; and whether each serves its
    model (ok, not served, unreachable), checked now as a starting worker does."""
    # the worker extra (openai, aiohttp): not in the base install
    from worker.llm.model_check import check_models

    r = connect_redis()
    s = get_settings()
    rows = endpoint_snapshots(r, [ep.url for ep in s.llm.all_endpoints], GateConfig.from_settings(s.llm).start)
    checks = check_models(s)
    if as_json:
        for row, check in zip(rows, checks, strict=True):
            print(json.dumps({**row, "model": check.as_dict()}))
        return
    table = Table(title="endpoints")
    for col in ("url", "model", "in flight", "cap", "cooling (s)", "ok", "errors", "cap cuts", "latency cuts",
                "cool-downs", "learned"):
        table.add_column(col)
    for row, check in zip(rows, checks, strict=True):
        table.add_row(
            row["url"], escape(f"{check.model}: {check.summary()}"), str(row["in_flight"]), f"{row['limit']:g}",
            f"{row['cooling_s']:g}", str(row["ok"]), str(row["errors"]), str(row["cuts"]), str(row["latency_cuts"]),
            str(row["trips"]), _learned(row),
        )
    out.print(table)


def _learned(row: dict) -> str:
    """What the endpoint refused, as every worker knows it (``formats_refused``, ``streams``, ``one_at_a_time``)."""
    said = [f"first {row['formats_refused']} response_format(s) refused"] if row["formats_refused"] else []
    said += [] if row["streams"] else ["not streamed"]
    said += ["one request at a time"] if row["one_at_a_time"] else []
    return "; ".join(said) or "-"
