"""Results in PostgreSQL (durable): one row per job, upserted by job id."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, insert

from medq.core.crypto import Sealer, open_doc, seal_doc
from medq.core.errors import StoreUnavailable
from medq.state.jobs import ScriptCalls

metadata = sa.MetaData()
results = sa.Table(
    "medq_results",
    metadata,
    sa.Column("job_id", sa.Text, primary_key=True),
    sa.Column("batch", sa.Text, nullable=False, index=True),
    sa.Column("record_id", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("doc", JSONB, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
)

_CHUNK = 1000

# A connection that takes longer is a server away: say so (StoreUnavailable) rather than
# hold a worker thread for the kernel's TCP timeout (minutes). The URL's own wins.
_CONNECT_TIMEOUT_S = 10

# The database cannot be reached: refused or dropped connections, a server shutting down,
# a pool with no connection to give. SQLAlchemy wraps psycopg's; a bare one is caught too.
_UNREACHABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError,
                psycopg.OperationalError, psycopg.InterfaceError)


@contextmanager
def _reachable() -> Iterator[None]:
    """Translate "PostgreSQL is away" into :class:`StoreUnavailable` (back-pressure). Named by
    type only, and without its cause: the driver's text quotes the SQL and its parameters
    (the document's metadata and values), which must reach no log and no Celery result."""
    try:
        yield
    except _UNREACHABLE as exc:
        raise StoreUnavailable(f"PostgreSQL results store unreachable ({type(exc).__name__})") from None
    except sa.exc.DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        raise StoreUnavailable(f"PostgreSQL results store unreachable ({type(exc).__name__})") from None


def _driver_url(url: str) -> str:
    # SQLAlchemy reads plain postgresql:// as psycopg2; medq ships psycopg 3.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class PostgresResultStore:
    def __init__(self, url: str, sealer: Sealer | None = None) -> None:
        self.sealer = sealer
        connect_args = {} if "connect_timeout=" in url else {"connect_timeout": _CONNECT_TIMEOUT_S}
        self._engine = sa.create_engine(_driver_url(url), pool_pre_ping=True, connect_args=connect_args)
        metadata.create_all(self._engine, checkfirst=True)

    def put(self, doc: dict[str, Any]) -> bool:
        stmt = insert(results).values(
            job_id=doc["job_id"], batch=doc["batch"], record_id=doc["id"], status=doc["status"],
            doc=seal_doc(doc, self.sealer),
        )
        upsert = stmt.on_conflict_do_update(
            index_elements=[results.c.job_id],
            set_={"status": stmt.excluded.status, "doc": stmt.excluded.doc, "updated_at": sa.func.now()},
            where=results.c.status != "succeeded",  # the first success is kept
        ).returning(results.c.job_id)
        with _reachable(), self._engine.begin() as conn:
            return conn.execute(upsert).first() is not None

    async def aput(self, doc: dict[str, Any], calls: ScriptCalls | None = None) -> bool:
        """:meth:`put` in a thread, off the worker's loop. ``calls`` is not used: PostgreSQL
        cannot see a purge of the job states (the worker deletes such a result afterwards)."""
        return await asyncio.to_thread(self.put, doc)

    def delete(self, job_ids: Iterable[str]) -> int:
        ids = list(job_ids)
        with _reachable(), self._engine.begin() as conn:
            return sum(conn.execute(sa.delete(results).where(results.c.job_id.in_(ids[i : i + _CHUNK]))).rowcount
                       for i in range(0, len(ids), _CHUNK))

    def delete_batch(self, batch: str) -> int:
        with _reachable(), self._engine.begin() as conn:
            return int(conn.execute(sa.delete(results).where(results.c.batch == batch)).rowcount)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with _reachable(), self._engine.connect() as conn:
            doc = conn.execute(sa.select(results.c.doc).where(results.c.job_id == job_id)).scalar()
        return open_doc(_doc(doc), self.sealer) if doc is not None else None

    def get_many(self, job_ids: Iterable[str]) -> Iterator[dict[str, Any]]:
        ids = list(job_ids)
        with _reachable(), self._engine.connect() as conn:
            for i in range(0, len(ids), _CHUNK):
                rows = conn.execute(sa.select(results.c.doc).where(results.c.job_id.in_(ids[i : i + _CHUNK])))
                for (doc,) in rows:
                    yield open_doc(_doc(doc), self.sealer)

    def close(self) -> None:
        self._engine.dispose()


def _doc(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else json.loads(value)
