"""`medq worker`: this process becomes `celery worker` on the medq queue, with medq's settings."""

from __future__ import annotations

import os
import sys

import typer

from medq.core.settings import get_settings

app = typer.Typer()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    concurrency: int | None = typer.Option(
        None, "-c", "--concurrency",
        help="Task messages at once (default MEDQ_WORKER__CONCURRENCY); each carries up to MEDQ_JOBS_PER_MESSAGE jobs. "
             "Requests in flight are capped by MEDQ_LLM__MAX_IN_FLIGHT.",
    ),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l", help="Log level."),
    pool: str | None = typer.Option(None, "--pool", "-P", help="threads (default), prefork or solo."),
) -> None:
    """A Celery worker bound to the configured endpoint(s). Options after -- go to `celery worker`.

    --burst [BATCH]: work until BATCH (or, without one, the whole queue) has no queued,
    running or retrying job, then exit: 0 all succeeded, 1 some failed (`medq failed BATCH`),
    3 stopped before it was done, 4 the batch has no jobs. For cron jobs, Kubernetes Jobs
    and CI, like rq's and arq's burst mode. (Celery's worker takes it: `celery -A
    worker.celery_app worker --burst` does the same.)
    """
    s = get_settings()
    args = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", "medq",
        "-P", pool or s.worker.pool,
        "-c", str(concurrency or s.worker.concurrency),
        "--loglevel", loglevel,
        # Unique per process, so several workers on one host do not collide.
        "-n", f"medq-{os.getpid()}@%h",
        *ctx.args,
    ]
    sys.stdout.flush()
    os.execv(sys.executable, args)
