"""`medq api`: the HTTP service, for other services to enqueue and read."""

from __future__ import annotations

import logging

import typer

from medq.cli.common import err, fail
from medq.core.errors import SchemaError
from medq.core.settings import get_settings

app = typer.Typer()


@app.command()
def api(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Tokens travel in plain HTTP: keep it on "
                             "loopback or a private network, or put a TLS proxy in front."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth",
                                          help="Run without tokens when MEDQ_API__TOKENS is empty (anyone who reaches "
                                               "the port can enqueue and read)."),
) -> None:
    """The HTTP service for other services: enqueue records and batches, read states and results.
    Bearer tokens from MEDQ_API__TOKENS (CLIENT:TOKEN, comma-separated); OpenAPI at /docs and /openapi.json."""
    # the server extra (fastapi, uvicorn, prometheus_client): not in the base install
    from medq.api.app import create_app
    from medq.api.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        application = create_app(get_settings(), insecure_no_auth=insecure_no_auth)
    except (ValueError, SchemaError) as exc:
        raise fail(str(exc)) from None
    if application.state.token_digests is None:
        err.print("[yellow]warning:[/yellow] medq api without tokens (--insecure-no-auth)", highlight=False)
    serve(application, host, port, get_settings())  # uvicorn, with time limits on slow clients
