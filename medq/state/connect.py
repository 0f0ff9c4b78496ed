"""Reaching the Redis of ``MEDQ_REDIS_URL``: one factory for every client medq makes.

``redis://``, ``rediss://`` and ``unix://`` go to ``redis.Redis.from_url``. A Redis
behind Sentinel (a master and its replicas, watched by sentinels that promote a replica
when the master dies) is named by a ``sentinel://`` URL in the form Celery and kombu
take, plus the master's name, which they take as a transport option only::

    sentinel://[USER:PASSWORD@]HOST[:PORT][/DB][;sentinel://HOST2[:PORT][/DB]...]?master_name=NAME

Each ``;``-separated part is one sentinel (port 26379 by default); the user and password
are the master's (the sentinels themselves without a password); ``?master_name=`` may
follow any part. redis-py's ``from_url`` does not read such URLs, and kombu refuses a
query string in them, so Celery gets the URL from :func:`celery_url` and the master's
name from :func:`celery_transport_options`: one ``MEDQ_REDIS_URL`` serves the job
states, the broker and Celery's results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, overload
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from medq.core.urls import redact_url

SENTINEL_PORT = 26379
_SEPARATOR = ";"


@dataclass(frozen=True)
class SentinelURL:
    """A ``sentinel://`` URL, read: where the sentinels are and which master to ask them for."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.split(":", 1)[0].lower() == "sentinel"


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read a ``sentinel://`` URL (module docstring); ``ValueError`` says what is wrong,
    without the password."""
    sentinels: list[tuple[str, int]] = []
    dbs: set[int] = set()
    master_name = username = password = None
    for part in url.split(_SEPARATOR):
        p = urlsplit(part.strip())
        if p.scheme.lower() != "sentinel" or not p.hostname:
            raise ValueError(f"{shown_url(url)}: each ';'-separated part must be sentinel://HOST[:PORT][/DB]")
        sentinels.append((p.hostname, p.port or SENTINEL_PORT))
        if p.path.strip("/"):
            if not p.path.strip("/").isdigit():
                raise ValueError(f"{shown_url(url)}: the database must be a number, as in sentinel://HOST:PORT/0")
            dbs.add(int(p.path.strip("/")))
        if p.username or p.password:
            username, password = (unquote(p.username) if p.username else None), unquote(p.password or "") or None
        for key, value in parse_qsl(p.query):
            if key != "master_name":
                raise ValueError(f"{shown_url(url)}: unknown parameter {key!r} (a sentinel URL takes master_name only)")
            master_name = value
    if not master_name:
        raise ValueError(f"{shown_url(url)}: a sentinel URL needs the master's name: ...?master_name=mymaster")
    if len(dbs) > 1:
        raise ValueError(f"{shown_url(url)}: the sentinels name different databases {sorted(dbs)}")
    return SentinelURL(tuple(sentinels), master_name, dbs.pop() if dbs else 0, username, password)


@overload
def connect(url: str, *, asyncio: Literal[False] = False, decode_responses: bool = False,
            **kwargs: Any) -> redis.Redis: ...
@overload
def connect(url: str, *, asyncio: Literal[True], decode_responses: bool = False,
            **kwargs: Any) -> redis.asyncio.Redis: ...
def connect(url: str, *, asyncio: bool = False, decode_responses: bool = False,
            **kwargs: Any) -> redis.Redis | redis.asyncio.Redis:
    """A client of the Redis at ``url`` (``redis://``, ``rediss://``, ``unix://`` or
    ``sentinel://``); ``asyncio`` for a ``redis.asyncio`` client. ``kwargs`` go to the
    connections (``socket_connect_timeout=2``), the sentinels' too. Behind Sentinel the
    client asks the sentinels for the master on every new connection, so after a
    failover it writes to the promoted replica."""
    if not is_sentinel(url):
        if asyncio:
            return redis.asyncio.Redis.from_url(url, decode_responses=decode_responses, **kwargs)
        return redis.Redis.from_url(url, decode_responses=decode_responses, **kwargs)
    s = parse_sentinel_url(url)
    to_sentinels = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    master = {"db": s.db, "username": s.username, "password": s.password, "decode_responses": decode_responses, **kwargs}
    # redis-py's Sentinel classes carry no annotations: typed here, by what master_for returns
    sentinel: Any = (redis.asyncio.sentinel.Sentinel if asyncio else redis.sentinel.Sentinel)(
        list(s.sentinels), sentinel_kwargs=to_sentinels)
    client: redis.Redis | redis.asyncio.Redis = sentinel.master_for(
        s.master_name, redis_class=redis.asyncio.Redis if asyncio else redis.Redis, **master)
    return client


def celery_url(url: str) -> str:
    """The URL to give Celery for its broker and result backend: a sentinel URL as kombu
    reads it (no query string, which kombu refuses; the database on every part, since
    kombu reads the first and fails over to the others); any other URL as it is."""
    if not is_sentinel(url):
        return url
    s = parse_sentinel_url(url)
    auth = ""
    if s.username or s.password:
        user = quote(s.username or "", safe="")
        auth = f"{user}:{quote(s.password, safe='')}@" if s.password else f"{user}@"
    return _SEPARATOR.join(f"sentinel://{auth}{_host(h)}:{port}/{s.db}" for h, port in s.sentinels)


def celery_transport_options(url: str) -> dict[str, Any]:
    """What Celery needs beside :func:`celery_url`: for a sentinel URL the master's name,
    to merge into both ``broker_transport_options`` and ``result_backend_transport_options``;
    nothing for any other URL."""
    return {"master_name": parse_sentinel_url(url).master_name} if is_sentinel(url) else {}


def shown_url(url: str) -> str:
    """``url`` as messages show it: each sentinel's part without its password (``redact_url``)."""
    return _SEPARATOR.join(redact_url(part) for part in url.split(_SEPARATOR))


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
