"""The ``medq`` command line (CONTRACT.md lists every command): the root app, one file per command group.

Exit codes: 0 done; 1 some jobs failed; 2 bad input or usage; 3 timed out waiting.
Importing this imports every command file, so theirs are module-level imports of the
base install only (tests/test_extras.py checks it); the extras load inside the command.
"""

from __future__ import annotations

import typer

from medq.cli import api, bench, demo, endpoints, flower, jobs, keygen, llm, metrics, review, schemas, worker
from medq.cli import eval as eval_command  # the module; imported as `eval` it would hide the builtin

app = typer.Typer(
    help="medq: extract structured data from clinical notes with a local LLM, through Redis and Celery workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Without a name a file's commands join the root; `medq --help` lists them in this order, then the groups.
for command_file in (jobs, endpoints, eval_command, review, demo, bench, worker, keygen, metrics, flower, api):
    app.add_typer(command_file.app)
app.add_typer(llm.app, name="llm")
app.add_typer(schemas.app, name="schemas")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
