"""`medq llm serve` and `medq llm simulate`: local OpenAI-compatible endpoints for the workers."""

from __future__ import annotations

import os
import sys

import typer

from medq.cli.common import DEFAULT_LOCAL_MODEL, err, fail
from medq.core.errors import LocalModelError

app = typer.Typer(help="Local OpenAI-compatible endpoints: the embedded model and the simulator.", no_args_is_help=True)


@app.command("serve")
def llm_serve(
    model: str = typer.Option(DEFAULT_LOCAL_MODEL, "--model", "-m",
                              help="gemma3-270m, smollm2, qwen2.5-coder-1.5b, qwen2.5-coder-0.5b (their parts installed "
                                   "by name, see README), or a path to a .gguf file."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (keep it on loopback or a private network)."),
    port: int = typer.Option(8080, help="Port to listen on."),
    n_ctx: int = typer.Option(4096, "--n-ctx", help="Context window in tokens."),
    threads: int | None = typer.Option(None, help="CPU threads that generate the answer (default: half the cores; "
                                                  "the prompt is read with all of them)."),
) -> None:
    """The embedded local model: llama.cpp's OpenAI-compatible server over a GGUF from a PyPI package."""
    # the local extra (the model packages): not in the base install
    from medq.tools.local_model import check_server_installed, resolve, server_command

    try:
        check_server_installed()
        local = resolve(model)
    except LocalModelError as exc:
        raise fail(str(exc)) from None
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


@app.command("simulate")
def llm_simulate(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8090, help="Port to listen on."),
    latency_ms: float = typer.Option(0.0, "--latency-ms", help="Time each request takes once it is served."),
    parallel: int = typer.Option(64, help="Requests served at once; the rest wait, as in a batching server."),
    fault: str = typer.Option("", help=(
        "Faults as KIND:RATE,... Kinds: 429, 500, 503, timeout, "
        "malformed, truncated, invalid, invented, runaway."
    )),
    seed: int | None = typer.Option(None, help="Random seed for reproducible faults."),
    reject_json_schema: bool = typer.Option(
        False, help="Refuse response_format json_schema (HTTP 500, as llama-cpp-python's server does)."
    ),
    dialect: str = typer.Option(
        "openai", help="openai, or tgi: take only TGI's response_format (type json + value), refuse others with TGI's 422."
    ),
    served_model: list[str] | None = typer.Option(
        None, "--served-model", help="Serve only these models (repeat, or comma-separated): /v1/models lists them and "
        "a request for another gets Ollama's 404 'model not found'. Default: any model name is taken.",
    ),
    context_tokens: int | None = typer.Option(
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
    stream: bool = typer.Option(
        True, "--stream/--no-stream", help="Stream answers when asked (stream: true), chunks spread over --latency-ms; "
        "--no-stream refuses streamed requests with a 400, as a server that does not stream.",
    ),
    interrupt_streams: bool = typer.Option(
        False, "--interrupt-streams", help="End a running stream ([DONE], no finish_reason) when another request waits "
        "for its slot, as llama-cpp-python's server does (interrupt_requests, its default).",
    ),
) -> None:
    """An OpenAI-compatible endpoint that answers schema-valid JSON without a model (load and fault tests)."""
    # the server extra (fastapi, uvicorn): not in the base install
    from medq.tools.simulator import make_config, serve

    config = make_config(
        latency_ms=latency_ms,
        parallel=parallel,
        fault=fault,
        seed=seed,
        reject_json_schema=reject_json_schema,
        dialect=dialect,
        served_model=served_model,
        context_tokens=context_tokens,
        context_overflow=context_overflow,
        advertise_context=advertise_context,
        stream=stream,
        interrupt_streams=interrupt_streams,
    )
    serve(config, host=host, port=port)
