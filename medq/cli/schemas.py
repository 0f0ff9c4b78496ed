"""`medq schemas list` and `medq schemas show`: the extraction schemas medq has loaded."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from medq.cli.common import EXIT_BAD_INPUT, err, fail, out
from medq.core.errors import SchemaError, SchemaVersionUnavailable, UnknownSchema
from medq.core.schemas import SchemaLoader
from medq.core.settings import get_settings

app = typer.Typer(help="The extraction schemas medq has loaded.", no_args_is_help=True)


@app.command("list")
def schemas_list() -> None:
    """The schemas found in medq's configs/schemas, ./configs/schemas and MEDQ_SCHEMAS_DIRS, every loaded version;
    files that cannot be loaded are listed as problems (exit 2)."""
    loader = SchemaLoader(get_settings().schema_dirs)
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


@app.command("show")
def schemas_show(
    name: str = typer.Argument(..., help="Schema name."),
    version: int | None = typer.Option(None, "--version", help="A loaded version (default: the newest)."),
) -> None:
    """A schema as the JSON Schema sent to the model."""
    try:
        sch = SchemaLoader(get_settings().schema_dirs).get(name, version)
    except (SchemaError, UnknownSchema, SchemaVersionUnavailable) as exc:
        raise fail(exc.message) from None
    print(json.dumps(
        {"name": sch.name, "version": sch.version, "description": sch.description,
         "instructions": sch.instructions, "json_schema": sch.json_schema},
        indent=2, ensure_ascii=False,
    ))
