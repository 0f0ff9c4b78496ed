"""The privacy guard: where a worker may send patient text.

A worker sends every note it runs to its LLM endpoints. It refuses to start when an
endpoint's host is not on this machine or a private network (loopback, RFC 1918,
IPv6 ULA, link-local), unless the host is listed in ``MEDQ_LLM__ALLOWED_HOSTS`` or
the operator opts in with ``MEDQ_ALLOW_REMOTE_LLM=true``. OpenAI's API is therefore
opt-in. A host name counts as private when every address it resolves to is.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from medq.core.errors import RemoteEndpointRefused
from medq.core.urls import redact_url


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    return ip.is_loopback or ip.is_private or ip.is_link_local


def why_not_private(url: str, allowed_hosts: Iterable[str] = ()) -> str | None:
    """None if ``url`` may receive patient text; else why not (naming no settings)."""
    host = (urlsplit(url).hostname or "").lower()
    if not host:
        return f"{redact_url(url)!r} has no host"
    if host in {h.lower() for h in allowed_hosts}:
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return None
    try:
        return None if _private(host) else f"{host} is a public address"
    except ValueError:
        pass  # a name, not an address
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return f"{host} does not resolve here, so it cannot be shown to be private"
    public = sorted(a for a in addresses if not _private(str(a)))
    return f"{host} resolves to public address(es) {', '.join(map(str, public))}" if public else None


def check_endpoints(urls: Iterable[str], allowed_hosts: Iterable[str] = (), allow_remote: bool = False) -> None:
    """Raise :class:`RemoteEndpointRefused` for the first endpoint that may not get notes."""
    if allow_remote:
        return
    allowed = list(allowed_hosts)
    for url in urls:
        why = why_not_private(url, allowed)
        if why is not None:
            raise RemoteEndpointRefused(
                f"refusing to send patient text to {redact_url(url)}: {why}. medq only talks to endpoints on this "
                f"machine or a private network. List the host in MEDQ_LLM__ALLOWED_HOSTS "
                f"(e.g. MEDQ_LLM__ALLOWED_HOSTS='[\"gpu1.hospital.internal\"]'), or set "
                f"MEDQ_ALLOW_REMOTE_LLM=true to allow any endpoint."
            )
