"""Result stores: one file per backend, chosen by the URL's scheme.

A store keeps one document per job id (CONTRACT.md "Results"). ``put`` is an upsert
that never replaces a success: the first successful result of a job is the one kept,
so a job run twice (a redelivery after a lost worker) can neither leave two results
nor swap its result for another.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from medq.core.crypto import Sealer
from medq.state.jobs import ScriptCalls
from medq.state.results.redis_store import RedisResultStore


class ResultStore(Protocol):
    def put(self, doc: dict[str, Any]) -> bool:
        """Store the result of ``doc["job_id"]`` unless a success is already stored
        (a failure is replaced by a later run's result). True if it was written."""

    async def aput(self, doc: dict[str, Any], calls: ScriptCalls | None = None) -> bool:
        """:meth:`put` on the running asyncio loop (the worker engine's). ``calls``: the
        worker's batched calls to the job-state Redis. A store that lives in that Redis
        writes through them, refusing (False) the result of a job purged while it ran, in
        the same atomic step; the others cannot see the purge and ignore them (the worker
        deletes such a result afterwards)."""

    def get(self, job_id: str) -> dict[str, Any] | None: ...

    def delete(self, job_ids: Iterable[str]) -> int:
        """Delete the results of ``job_ids`` (erasure: ``medq purge --results``, a job
        purged while it ran). Returns how many there were."""

    def delete_batch(self, batch: str) -> int:
        """Delete every result of ``batch`` the store can find by batch (PostgreSQL's
        ``batch`` column, rows kept long after the batch's job states expired); 0 where
        results are found by job id only (Redis)."""

    def get_many(self, job_ids: Iterable[str]) -> Iterator[dict[str, Any]]:
        """The stored results among ``job_ids``; ids without a result are skipped."""

    def close(self) -> None: ...


def open_store(url: str, *, redis_url: str | None = None, ttl_s: int | None = None, sealer: Any = None) -> ResultStore:
    """``redis://`` / ``rediss://`` / ``unix://`` / ``sentinel://`` -> Redis; ``postgresql://`` -> PostgreSQL.
    With a ``medq.core.crypto.Sealer``, documents are encrypted at rest. ``redis_url``: the
    job states' Redis; a Redis store there keeps results beside them (``aput``)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("redis", "rediss", "unix", "sentinel"):
        return RedisResultStore(url, ttl_s=ttl_s, sealer=sealer, beside_jobs=url == redis_url)
    if scheme.startswith("postgres"):
        # Here, not above: sqlalchemy and psycopg come with the "postgres" extra only.
        from medq.state.results.postgres_store import PostgresResultStore

        return PostgresResultStore(url, sealer=sealer)
    raise ValueError(f"MEDQ_RESULTS_URL: unsupported scheme {scheme!r} (use redis:// or postgresql://)")


def open_store_for(settings: Any) -> ResultStore:
    """The result store the settings name (``MEDQ_RESULTS_URL``), encrypting with
    ``MEDQ_ENCRYPTION_KEY`` when one is set."""
    return open_store(
        settings.effective_results_url, redis_url=settings.redis_url, ttl_s=settings.results_ttl_s,
        sealer=Sealer.from_settings(settings),
    )
