"""Endpoint URLs as medq shows them, and as it sends them.

An operator may put credentials in a URL (``http://user:pw@gpu1:8000/v1``,
``redis://:pw@host:6379/0``). Wherever a URL is shown or stored (metrics labels,
``medq endpoints``, error messages, logs, each result's ``endpoint``) it goes through
:func:`redact_url`. Requests authenticate with :func:`split_credentials`: the URL
without its userinfo, and the userinfo as an ``Authorization: Basic`` header, the
header httpx (the SDK's client) makes from such a URL, so both clients send the same.
"""

from __future__ import annotations

import base64
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "***"


def _without_userinfo(url: str) -> tuple[str, str | None]:
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url, None
    return urlunsplit(parts._replace(netloc=hostport)), userinfo


def redact_url(url: str) -> str:
    """``url`` with its userinfo (user and password) replaced by ``***``; else unchanged."""
    bare, userinfo = _without_userinfo(url)
    if userinfo is None:
        return url
    parts = urlsplit(bare)
    return urlunsplit(parts._replace(netloc=f"{REDACTED}@{parts.netloc}"))


def split_credentials(url: str) -> tuple[str, str | None]:
    """The URL to request, without userinfo, and the ``Authorization`` header value its
    userinfo stands for (HTTP basic, as httpx sends it), or None without userinfo."""
    bare, userinfo = _without_userinfo(url)
    if userinfo is None:
        return url, None
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return bare, f"Basic {token}"
