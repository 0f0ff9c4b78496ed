"""``medq api``'s bearer tokens: ``MEDQ_API__TOKENS`` read once, and the dependency that
names the client a request's token belongs to.

Only the tokens' SHA-256 digests are kept, and every one is compared in constant time
whatever matched before, so the answer's timing does not tell how much of a token was
right. Errors never show a token.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from medq.api.deps import ApiState, api_state
from medq.api.errors import APIError

MIN_TOKEN_CHARS = 16


def parse_tokens(raw: str) -> list[tuple[str, str]]:
    """``MEDQ_API__TOKENS`` -> [(client, token)]. ``CLIENT:TOKEN`` names the client; a bare
    token's client is ``client-`` and 8 hex digits of its hash. Errors never show a token."""
    out: list[tuple[str, str]] = []
    for n, part in enumerate((p.strip() for p in raw.split(",")), start=1):
        if not part:
            continue
        client, sep, token = part.partition(":")
        if not sep:
            client, token = "client-" + hashlib.sha256(part.encode()).hexdigest()[:8], part
        if not re.fullmatch(r"[A-Za-z0-9._\-]{1,64}", client):
            raise ValueError(f"MEDQ_API__TOKENS entry {n}: the client name must be letters, digits, '.', '_' or '-'")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"MEDQ_API__TOKENS entry {n} ({client}): the token is shorter than {MIN_TOKEN_CHARS} "
                             "characters; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        out.append((client, token))
    if len({t for _, t in out}) != len(out):
        raise ValueError("MEDQ_API__TOKENS: the same token is given twice")
    return out


def token_digests(raw: str, insecure_no_auth: bool) -> list[tuple[str, bytes]] | None:
    """[(client, SHA-256 of its token)] from ``MEDQ_API__TOKENS``; None (no tokens checked)
    only when there are none and ``insecure_no_auth`` is given. Raises ``ValueError`` when
    the setting is missing or malformed."""
    pairs = parse_tokens(raw)
    if not pairs and not insecure_no_auth:
        raise ValueError("set MEDQ_API__TOKENS (CLIENT:TOKEN, comma-separated), or pass --insecure-no-auth")
    if insecure_no_auth and not pairs:
        return None
    return [(client, hashlib.sha256(token.encode()).digest()) for client, token in pairs]


_bearer = HTTPBearer(auto_error=False, description="A token from MEDQ_API__TOKENS.")


def client_of(
    request: Request,
    cred: HTTPAuthorizationCredentials | None = Security(_bearer),
    state: ApiState = Depends(api_state),
) -> str:
    """The client the bearer token belongs to (a dependency: ``Security(client_of)``). Every
    configured token is compared, in constant time, whatever matched before. The client is
    also left in ``request.state`` for the access log."""
    digests = state.token_digests
    if digests is None:  # --insecure-no-auth
        client = "anonymous"
    else:
        if cred is None:
            raise APIError(401, "missing bearer token: send 'Authorization: Bearer <token>' (MEDQ_API__TOKENS)",
                           headers={"WWW-Authenticate": "Bearer"})
        given = hashlib.sha256(cred.credentials.encode("utf-8", "surrogateescape")).digest()
        found = ""
        for name, digest in digests:
            if hmac.compare_digest(given, digest):
                found = name
        if not found:
            raise APIError(401, "invalid bearer token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        client = found
    request.state.client = client
    return client
