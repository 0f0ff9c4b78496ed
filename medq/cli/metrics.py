"""`medq metrics`: medq's metrics for Prometheus, read from Redis."""

from __future__ import annotations

import signal

import typer

from medq.cli.common import err
from medq.core.settings import get_settings

app = typer.Typer()


@app.command()
def metrics(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(9808, "--port", help="Port to listen on."),
) -> None:
    """Serve medq's metrics for Prometheus at /metrics: jobs by schema and outcome, LLM latency,
    tokens, re-asks, truncations, rate-limit waits, queue length, in flight per endpoint."""
    # the server extra (prometheus_client): not in the base install
    from prometheus_client import start_http_server

    from medq.state.prometheus import registry_for

    start_http_server(port, addr=host, registry=registry_for(get_settings()))
    err.print(f"medq metrics on http://{host}:{port}/metrics", highlight=False)
    signal.pause()
