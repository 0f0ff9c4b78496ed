"""Progress of a batch in the terminal: a rich bar polled from the job states."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medq.core.errors import WaitTimeout
from medq.state.jobs import counts


def wait_for_batch(
    r: redis.Redis,
    batch: str,
    console: Console,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
    check: Callable[[], None] | None = None,
) -> Counter[str]:
    """Show a bar (done, ok, failed, jobs/s, ETA) until every job has finished; the
    final counts per state. ``check`` runs each poll, to fail fast if a helper died."""
    started = time.monotonic()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[ok]} ok[/green] [red]{task.fields[failed]} failed[/red]"),
        TextColumn("{task.fields[rate]:.2f} jobs/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        c = counts(r, batch)
        total = sum(c.values())
        already = c["succeeded"] + c["failed"]
        task = progress.add_task(batch, total=total, ok=c["succeeded"], failed=c["failed"], rate=0.0)
        while True:
            c = counts(r, batch)
            done = c["succeeded"] + c["failed"]
            elapsed = time.monotonic() - started
            rate = (done - already) / elapsed if elapsed > 0 else 0.0
            progress.update(task, completed=done, ok=c["succeeded"], failed=c["failed"], rate=rate)
            if done >= total:
                return c
            if timeout_s is not None and elapsed > timeout_s:
                raise WaitTimeout(total - done)
            if check is not None:
                check()
            time.sleep(poll_s)
