"""Serve ``medq api`` with uvicorn, bounded against slow clients.

uvicorn bounds how long an idle connection stays open between requests
(``timeout_keep_alive``), how many connections it serves at once (``limit_concurrency``,
503 beyond) and how large headers may grow, but not how long a client may take to send
a request's headers: a client that sends a header line every few seconds holds its
connection for ever. The protocol below closes a connection whose headers are not
complete within ``MEDQ_API__HEADER_TIMEOUT_S`` of its first byte (or of its opening).
The body is bounded inside the app (``medq.api.app._BodyDeadline``, 408).

The protocol subclasses uvicorn's httptools one (its hooks ``on_message_begin`` and
``on_headers_complete`` are httptools' parser callbacks); without httptools, uvicorn's
h11 protocol is used as it is and headers are not bounded in time (a warning says so).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from medq.core.settings import Settings

log = logging.getLogger("medq.api")


def header_deadline_protocol(timeout_s: float) -> type[asyncio.Protocol] | None:
    """uvicorn's httptools protocol, closing a connection whose request headers take longer
    than ``timeout_s``; None without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # each request on a kept-alive connection gets its own time

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.info("closed a connection whose request headers took over %gs (MEDQ_API__HEADER_TIMEOUT_S)",
                         timeout_s)
                self.transport.close()

    return HeaderDeadlineProtocol


def serve(application: Any, host: str, port: int, settings: Settings) -> None:
    """Run the app until stopped."""
    import uvicorn

    api = settings.api
    protocol = header_deadline_protocol(api.header_timeout_s)
    if protocol is None:
        log.warning("httptools is not installed: request headers are not bounded in time (MEDQ_API__HEADER_TIMEOUT_S)")
    # uvicorn's access log prints paths and query strings; medq.api.app logs route templates instead.
    uvicorn.run(
        application, host=host, port=port, access_log=False, log_level="info", server_header=False,
        http=protocol or "auto", limit_concurrency=api.max_connections,
        h11_max_incomplete_event_size=64 * 1024,  # headers (h11 only; httptools keeps its own bound)
    )
