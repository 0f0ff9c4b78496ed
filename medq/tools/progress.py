"""Progress of a batch in the terminal: a rich bar polled from the job states."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medq.core.errors import BatchGone, WaitTimeout
from medq.state.jobs import counts
from medq.state.persistence import restart_note, server_life


def wait_for_batch(
    r: redis.Redis,
    batch: str,
    console: Console,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
    check: Callable[[], None] | None = None,
    expected: int = 0,
) -> Counter[str]:
    """Show a bar (done, ok, failed, jobs/s, ETA) until every job has finished; the
    final counts per state. ``check`` runs each poll, to fail fast if a helper died.
    ``expected``: jobs the caller knows the batch has (it just enqueued them).

    A batch is finished only when every job it was seen with (or ``expected``) is final:
    fewer job states than that means states vanished (``BatchGone``), never "done". While
    Redis does not answer (restarting) the wait goes on, within ``timeout_s``."""
    started = time.monotonic()
    life = server_life(r)  # None while Redis does not answer
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
        task = progress.add_task(batch, total=expected or None, ok=0, failed=0, rate=0.0)
        known, already, done = expected, None, 0
        while True:
            elapsed = time.monotonic() - started
            try:
                c = counts(r, batch)
            except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError too: reading its files
                progress.update(task, description=f"{batch} (Redis does not answer; waiting)")
            else:
                total = sum(c.values())
                if already is None:  # the first reading: what the batch holds now
                    known, already = max(known, total), c["succeeded"] + c["failed"]
                    if known == 0:
                        raise BatchGone(batch, note=restart_note(life))
                if total < known:
                    raise BatchGone(batch, known, total, restart_note(server_life(r), life))
                known, done = total, c["succeeded"] + c["failed"]  # jobs enqueued into the batch meanwhile count too
                rate = (done - already) / elapsed if elapsed > 0 else 0.0
                progress.update(task, description=batch, total=known, completed=done, ok=c["succeeded"],
                                failed=c["failed"], rate=rate)
                if done >= known:
                    return c
            if timeout_s is not None and elapsed > timeout_s:
                raise WaitTimeout(known - done)
            if check is not None:
                check()
            time.sleep(poll_s)

