"""`medq demo`: the README's first command, the whole path on the embedded model."""

from __future__ import annotations

import typer

from medq.cli.common import DEFAULT_LOCAL_MODEL, err, fail, out
from medq.core.errors import DemoError

app = typer.Typer()


@app.command()
def demo(
    model: str = typer.Option(DEFAULT_LOCAL_MODEL, "--model", "-m", help=(
        "Embedded model: qwen2.5-coder-1.5b (default), "
        "qwen2.5-coder-0.5b, gemma3-270m, smollm2 (fastest, lowest score), or a .gguf path."
    )),
    schema: str = typer.Option("clinical_note", "--schema", help="Which bundled samples: clinical_note or discharge_summary."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N sample records."),
    endpoint: str | None = typer.Option(None, "--endpoint", help=(
        "Use this running OpenAI-compatible server (…/v1) instead of "
        "starting the embedded one."
    )),
    endpoint_model: str | None = typer.Option(None, "--endpoint-model", help=(
        "Model name to send with --endpoint (default "
        "MEDQ_LLM__MODEL)."
    )),
    concurrency: int = typer.Option(1, "-c", "--concurrency", help=(
        "Requests in flight to the model (the embedded server "
        "answers one at a time)."
    )),
    strategy: str | None = typer.Option(None, "--strategy", help="single or fields (default: what scored best for the model)."),
    grounding: str | None = typer.Option(None, "--grounding", help="flag or drop values not found in the note."),
    few_shot: bool | None = typer.Option(None, "--few-shot/--no-few-shot", help="Show the schema's examples to the model."),
    timeout_s: float | None = typer.Option(None, "--timeout-s", help="Give up after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of tables."),
) -> None:
    """The main job on the embedded model: start what is missing, extract the bundled samples, score them, stop."""
    # the local extra (llama-cpp-python's server, the model packages): not in the base install
    from medq.tools.demo import DemoOptions, run_demo

    if strategy not in (None, "single", "fields"):
        raise fail("--strategy must be single or fields")
    if grounding not in (None, "flag", "drop"):
        raise fail("--grounding must be flag or drop")
    opts = DemoOptions(model=model, schema=schema, limit=limit, endpoint=endpoint, endpoint_model=endpoint_model,
                       concurrency=concurrency, strategy=strategy, grounding=grounding, few_shot=few_shot,
                       timeout_s=timeout_s, as_json=as_json)
    try:
        # Jobs that fail (a tiny model's answer may never validate) are shown in the
        # tables and scored as wrong; the demo itself succeeded if it got that far.
        run_demo(opts, err if as_json else out)
    except DemoError as exc:
        raise fail(str(exc), 1) from None
    except KeyboardInterrupt:
        err.print("interrupted; everything the demo started has been stopped", highlight=False)
        raise typer.Exit(130) from None
