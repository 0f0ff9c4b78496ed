"""What every route of one app shares: its settings, producer, results store and metrics,
made once by ``create_app`` and kept in ``app.state.api``; a route asks for it with
``Depends(api_state)``. Not closures over ``create_app``'s locals: routers are modules, and
two apps in one process share nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from fastapi import Request

from medq.api.errors import APIError
from medq.api.middleware import Stats
from medq.core.errors import BATCH_GONE_CAUSES
from medq.core.settings import Settings
from medq.state.jobs import owner_of
from medq.state.results import ResultStore
from producer.enqueue import Producer
from producer.uploads import max_item_bytes


@dataclass(frozen=True)
class ApiState:
    """One app's connections and limits."""

    settings: Settings
    producer: Producer
    store: ResultStore
    stats: Stats
    # [(client, SHA-256 of its token)]; None with --insecure-no-auth (then batches belong to no one)
    token_digests: list[tuple[str, bytes]] | None

    @property
    def r(self) -> redis.Redis:
        return self.producer.r

    @property
    def max_item_bytes(self) -> int:
        """The longest line or array item a record within MEDQ_MAX_RECORD_BYTES can need."""
        return max_item_bytes(self.settings.max_record_bytes)

    def taken(self, owner: str | None, client: str) -> bool:
        """Whether a batch held by ``owner`` is another client's (never without tokens)."""
        return owner is not None and owner != client and self.token_digests is not None

    def own(self, client: str, batch: str, missing: str | None = None) -> None:
        """Another client's batch (or one from ``medq enqueue``) answers exactly as one that
        does not exist: ``missing``, the caller's 404 for an unknown batch or job. A 403
        would confirm to one client that another's batch or job exists."""
        owner = owner_of(self.r, batch)
        if owner is None or self.taken(owner, client):
            # a batch whose states vanished with its owner (a Redis restart) answers here too
            raise APIError(404, missing or f"no batch {batch!r}: never made by this client, or its job states were "
                                           + BATCH_GONE_CAUSES)


async def api_state(request: Request) -> ApiState:
    """The app's shared state (a dependency: ``state: ApiState = Depends(api_state)``).
    ``async`` so FastAPI calls it in the event loop, not in a worker thread."""
    state: ApiState = request.app.state.api
    return state
