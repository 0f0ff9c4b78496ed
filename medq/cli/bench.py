"""`medq bench`: medq's throughput against a direct client's, through the real system."""

from __future__ import annotations

import json

import typer

from medq.cli.common import err, fail, out
from medq.core.errors import DemoError

app = typer.Typer()


@app.command()
def bench(
    jobs: int = typer.Option(2000, "--jobs", "-n", help="Jobs per phase."),
    latency_ms: float = typer.Option(200.0, "--latency-ms", help="Simulator latency per request."),
    parallel: int = typer.Option(64, "--parallel", help="Requests in flight: the simulator's and the workers' (MAX_IN_FLIGHT)."),
    workers: int = typer.Option(1, "--workers", help="Worker processes on this node."),
    concurrency: int | None = typer.Option(None, "-c", "--concurrency", help=(
        "Task messages per worker process (default: enough for 2 x "
        "parallel jobs in each)."
    )),
    pool: str = typer.Option("threads", "--pool", "-P", help="Celery pool of the workers."),
    endpoint: str | None = typer.Option(None, "--endpoint", help="Measure this OpenAI-compatible server instead of the simulator."),
    model: str | None = typer.Option(None, "--model", help="Model name to send to --endpoint."),
    overhead_jobs: int | None = typer.Option(None, "--overhead-jobs", help="Jobs for the latency-0 phase (default: --jobs)."),
    no_overhead: bool = typer.Option(False, "--no-overhead", help="Skip the latency-0 phase."),
    compare_broker: str | None = typer.Option(None, "--compare-broker", help=(
        "Measure the medq phases again with this broker (amqp://... for RabbitMQ) in the same run."
    )),
    as_json: bool = typer.Option(False, "--json", help="Print the measurements as JSON."),
) -> None:
    """Throughput through the real system against a direct client, measured side by side.

    Prints ceiling (direct asyncio client), medq (producer -> Redis -> workers ->
    endpoint -> results), utilisation = medq / ceiling, the latency-0 overhead phase
    with CPU ms per job, and p50/p95 latency per job."""
    # the server extra (the worker's openai and aiohttp): not in the base install
    from medq.tools.bench import Bench, BenchOptions, report_table

    opts = BenchOptions(jobs=jobs, latency_ms=latency_ms, parallel=parallel, workers=workers, concurrency=concurrency,
                        pool=pool, endpoint=endpoint, model=model, overhead_jobs=overhead_jobs, skip_overhead=no_overhead,
                        compare_broker=compare_broker)
    try:
        res = Bench(opts, err).run()
    except DemoError as exc:
        raise fail(str(exc), 1) from None
    except KeyboardInterrupt:
        err.print("interrupted; everything the bench started has been stopped", highlight=False)
        raise typer.Exit(130) from None
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        out.print(report_table(res))
