"""Fixtures the worker tests share: HTTP servers of the test's own, and PostgreSQL
behind a proxy the test can cut."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from tests.helpers import ADMIN_URL, OUTAGE_DB, PG_HOST, PG_PORT, Server, TcpProxy, ensure_database


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(answer: Callable[[BaseHTTPRequestHandler, bytes], tuple[int, dict[str, str], bytes]]) -> Server:
        started.append(Server(answer))
        return started[-1]

    yield start
    for s in started:
        s.close()


@pytest.fixture
def proxied_pg() -> Iterator[tuple[TcpProxy, str]]:
    """A PostgreSQL URL through a proxy the test can cut, on a database of its own."""
    ensure_database(OUTAGE_DB)
    proxy = TcpProxy((PG_HOST, PG_PORT))
    user = ADMIN_URL.split("://", 1)[1].split("@", 1)[0]
    yield proxy, f"postgresql://{user}@127.0.0.1:{proxy.port}/{OUTAGE_DB}"
    proxy.cut()
