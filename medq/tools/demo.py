"""``medq demo``: the whole pipeline on the embedded model, in one command.

Starts what is missing (Redis, if ``redis-server`` is on PATH and none answers;
the llama.cpp model server; one worker), enqueues the bundled sample records,
shows progress, prints the extractions and their score against the gold labels,
and stops exactly what it started, on success, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from medq.core.errors import BatchGone, DemoError, LocalModelError, WaitTimeout
from medq.core.settings import get_settings
from medq.core.urls import redact_url
from medq.state.results import open_store_for
from medq.state.results.export import iter_results
from medq.tools.evaluate import evaluate, records_by_id
from medq.tools.local_model import DEFAULT_MODEL, check_server_installed, resolve, server_command
from medq.tools.processes import (
    Supervisor,
    _free_port,
    _sigterm_as_interrupt,
    _wait_until,
    answers,
    ensure_redis,
)
from medq.tools.progress import wait_for_batch
from medq.tools.report import results_table, score_table
from medq.tools.samples import gold_path, sample_path
from producer.enqueue import Producer
from producer.records import check, limits_of, read_path

# What measured best per embedded model (README, "Extraction quality"; reproduce with
# `medq demo --model M --strategy S --grounding G`).
MODEL_PROFILES: dict[str, dict[str, str]] = {
    "smollm2": {"strategy": "single", "grounding": "drop", "few_shot": "true"},
    "gemma3-270m": {"strategy": "single", "grounding": "drop", "few_shot": "true"},
    # measured with the settings' defaults (flag: values without evidence are listed, kept)
    "qwen2.5-coder-1.5b": {"strategy": "single", "grounding": "flag", "few_shot": "true"},
    "qwen2.5-coder-0.5b": {"strategy": "single", "grounding": "flag", "few_shot": "true"},
}


def start_model_server(model: str, sup: Supervisor, console: Console, n_ctx: int = 4096) -> tuple[str, str]:
    """Start llama.cpp's server on a free port; (base URL, model name for requests)."""
    try:
        check_server_installed()
        local = resolve(model)
    except LocalModelError as exc:
        raise DemoError(str(exc)) from None
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    console.print(f"starting the embedded model {local.name} ({local.path.name}) at {base_url}", highlight=False)
    sup.start("model-server", server_command(local, "127.0.0.1", port, n_ctx=n_ctx), dict(os.environ))

    _wait_until(lambda: answers(f"{base_url}/models"), "the model server", sup, 180)
    return base_url, local.name


# The embedded server's context window; a longer note is read in pieces of it.
DEMO_CONTEXT_TOKENS = 4096


@dataclass
class DemoOptions:
    model: str = DEFAULT_MODEL
    schema: str = "clinical_note"
    limit: int | None = None
    endpoint: str | None = None  # use a running OpenAI-compatible server instead of starting one
    endpoint_model: str | None = None
    concurrency: int = 1
    strategy: str | None = None
    grounding: str | None = None
    few_shot: bool | None = None
    timeout_s: float | None = None
    as_json: bool = False


def run_demo(opts: DemoOptions, console: Console) -> dict[str, Any]:
    """Run the demo; returns a summary (score, timings). Raises ``DemoError``."""
    settings = get_settings()
    try:
        records_file, gold_file = sample_path(opts.schema), gold_path(opts.schema)
    except FileNotFoundError as exc:
        raise DemoError(str(exc)) from None
    log_dir = Path(tempfile.mkdtemp(prefix="medq-demo-"))
    sup = Supervisor(log_dir)
    finished = False
    with _sigterm_as_interrupt():
        try:
            ensure_redis(settings.redis_url, sup, console)
            own_redis = any(p.name == "redis" for p in sup.started)
            if opts.endpoint:
                base_url, model_name = opts.endpoint, opts.endpoint_model or settings.llm.model
                profile: dict[str, str] = {}
            else:
                base_url, model_name = start_model_server(opts.model, sup, console, n_ctx=DEMO_CONTEXT_TOKENS)
                profile = dict(MODEL_PROFILES.get(model_name, {}))
            if opts.strategy:
                profile["strategy"] = opts.strategy
            if opts.grounding:
                profile["grounding"] = opts.grounding
            if opts.few_shot is not None:
                profile["few_shot"] = "true" if opts.few_shot else "false"
            env = {
                **os.environ,
                "MEDQ_LLM__BASE_URL": base_url,
                "MEDQ_LLM__MODEL": model_name,
                # requests at once: the embedded server answers one at a time
                "MEDQ_LLM__MAX_IN_FLIGHT": str(opts.concurrency),
                # its context, which llama-cpp-python's server does not tell (llama.cpp's /props does)
                **({} if opts.endpoint else {"MEDQ_LLM__CONTEXT_TOKENS": str(DEMO_CONTEXT_TOKENS)}),
                **{f"MEDQ_LLM__{k.upper()}": v for k, v in profile.items()},
            }
            sup.start("worker", [sys.executable, "-m", "medq.cli", "worker", "-c", str(opts.concurrency),
                                 "--loglevel", "WARNING"], env)

            checked = check(read_path(records_file), **limits_of(settings))
            if opts.limit:
                checked.records = checked.records[: opts.limit]
            producer = Producer(settings)
            batch = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            started = time.monotonic()
            ids = producer.enqueue(checked, opts.schema, batch)
            console.print(f"batch {batch}: {len(ids)} sample records ({records_file.name}), "
                          f"model {model_name}, strategy {profile.get('strategy', settings.llm.strategy)}", highlight=False)
            try:
                wait_for_batch(producer.r, batch, console, opts.timeout_s, check=sup.check, expected=len(ids))
            except WaitTimeout as exc:
                raise DemoError(f"timed out after {opts.timeout_s:g}s with {exc.unfinished} job(s) unfinished") from None
            except BatchGone as exc:
                raise DemoError(exc.message) from None
            elapsed_s = time.monotonic() - started

            store = open_store_for(settings)
            docs = list(iter_results(producer.r, store, batch))
            store.close()
            sch = producer.schema_loader.get(opts.schema)
            golds_all = records_by_id(gold_file.read_text(encoding="utf-8").splitlines())
            wanted = {rec.id for rec in checked.records}
            golds = {k: v for k, v in golds_all.items() if k in wanted and v is not None}
            report = evaluate(sch, {d["id"]: d["data"] for d in docs}, golds)
            summary = {
                "batch": batch,
                "model": model_name,
                "endpoint": redact_url(base_url),
                "profile": profile,
                "records": len(docs),
                "succeeded": sum(d["status"] == "succeeded" for d in docs),
                "failed": sum(d["status"] == "failed" for d in docs),
                "elapsed_s": round(elapsed_s, 1),
                "s_per_record": round(elapsed_s / max(len(docs), 1), 2),
                "macro": report.macro,
                "report": report.as_dict(),
            }
            if opts.as_json:
                print(json.dumps(summary, ensure_ascii=False))
            else:
                console.print(results_table(docs, list(sch.field_names)))
                console.print(score_table(report))
                console.print(
                    f"{summary['succeeded']}/{len(docs)} succeeded in {elapsed_s:.0f}s "
                    f"({summary['s_per_record']}s per record); macro score "
                    f"{report.macro * 100 if report.macro is not None else 0:.0f}%."
                    + ("" if own_redis else f" Export: medq results {batch}"),
                    highlight=False,
                )
            finished = True
            return summary
        finally:
            sup.stop_all()
            if finished:
                shutil.rmtree(log_dir, ignore_errors=True)  # on failure the logs stay for the message
