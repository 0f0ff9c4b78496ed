"""`medq flower`: this process becomes Celery's Flower for the medq queue, behind a login."""

from __future__ import annotations

import os
import sys

import typer

from medq.cli.common import err, fail
from medq.core.settings import get_settings

app = typer.Typer()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def flower(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Basic auth over plain HTTP: keep it on "
                             "loopback and reach it through an SSH tunnel or a TLS proxy."),
    port: int = typer.Option(5555, "--port", help="Port to listen on."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth",
                                          help="Run without a login (anyone who reaches the port sees the queue)."),
) -> None:
    """Flower for the medq queue, with basic auth from MEDQ_FLOWER__USER / MEDQ_FLOWER__PASSWORD
    and Prometheus metrics at /metrics. Options after -- go to `celery flower`."""
    s = get_settings()
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    user, password = s.flower.user, s.flower.password.get_secret_value() if s.flower.password else None
    if user and password:
        if any(c in f"{user}{password}" for c in ",\n") or ":" in user:
            raise fail("MEDQ_FLOWER__USER must not contain ':' or ',' and MEDQ_FLOWER__PASSWORD not ',' (Flower splits on them)")
        env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"  # in the environment, not on the command line (ps)
    elif not insecure_no_auth:
        raise fail(
            "Flower shows job ids, record ids and error reasons, and can revoke tasks: set MEDQ_FLOWER__USER and "
            "MEDQ_FLOWER__PASSWORD, or pass --insecure-no-auth to run it without a login"
        )
    else:
        err.print("[yellow]warning:[/yellow] Flower without a login (--insecure-no-auth)", highlight=False)
        env["FLOWER_UNAUTHENTICATED_API"] = "true"  # open means the API too (Flower closes it by default)
    args = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower", f"--address={host}", f"--port={port}", *ctx.args]
    sys.stdout.flush()
    os.execve(sys.executable, args, env)
