"""Fixes to kombu's Redis transport that keep the worker alive when Redis goes away or
fills up. Applied by ``worker.celery_app`` when it is imported, before any connection."""

from __future__ import annotations

import logging
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

from medq.state.memory import full_message, wait_for_room


def keep_broker_params_for_restore() -> None:
    """Work around a kombu 5.7 failure that kills the worker when Redis goes away.

    When the broker connection drops while the consumer waits in BRPOP with
    unacknowledged messages, Celery first ``collect()``s the connection (which drops
    the transport's client) and then closes it. The second close restores the
    unacknowledged messages through a new pool, built from that client:
    ``AttributeError: 'NoneType' object has no attribute 'hostname'``, "Unrecoverable
    error", and the worker exits. Seen with celery 5.7.0 / kombu 5.7.0 in
    ``tests/chaos`` (Redis restarted under load), with a worker that mostly idles in
    BRPOP because each message carries many jobs. Each channel keeps the connection
    parameters it was made with and uses them then: the restore reaches Redis if it is
    back, or fails as a connection error (which kombu ignores there, and the messages
    come back after the visibility timeout)."""
    original = kombu_redis.Channel._connparams
    if getattr(original, "medq_patched", False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> dict[str, Any]:
        saved = self.__dict__.setdefault("_medq_connparams", {})
        if self.connection.client is None and asynchronous in saved:
            return dict(saved[asynchronous])
        params: dict[str, Any] = original(self, asynchronous=asynchronous)
        saved[asynchronous] = dict(params)
        return params

    _connparams.medq_patched = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]



def wait_while_redis_full() -> None:
    """A full Redis (``maxmemory``, ``noeviction``) must not kill the worker.

    Redis then refuses writes with ``OutOfMemoryError``, a ``ResponseError`` that kombu
    does not take for a connection error: its sweep for unacknowledged messages (a lock
    SET, at start and every few seconds) and its bookkeeping of a message just taken
    from the queue (ZADD + HSET) raise it out of the consumer, "Unrecoverable error",
    and the worker exits with that message popped and recorded nowhere. Instead: the
    sweep is skipped while Redis is full (it runs again later), and a taken message is
    held and its bookkeeping tried again, with a log line saying why, until there is
    room. Reads and deletes still work meanwhile, but not inside MULTI (Redis refuses
    every command queued in a transaction while full): acknowledgements (ZREM + HDEL,
    which free memory) go as a plain pipeline; a sweep reading the index meanwhile finds
    at worst a tag without its message, which it skips."""
    if getattr(kombu_redis.QoS.append, "medq_patched", False):
        return
    append, restore_visible = kombu_redis.QoS.append, kombu_redis.QoS.restore_visible
    remove_from_indices = kombu_redis.QoS._remove_from_indices

    def _remove_from_indices_(self: Any, delivery_tag: Any, pipe: Any = None) -> Any:
        if pipe is not None:  # part of a restore's transaction: as kombu does it
            return remove_from_indices(self, delivery_tag, pipe)
        with self.channel.conn_or_acquire() as client:
            return remove_from_indices(self, delivery_tag, client.pipeline(transaction=False))

    def _append(self: Any, message: Any, delivery_tag: Any) -> None:
        attempt = 0
        while True:
            try:
                return append(self, message, delivery_tag)  # type: ignore[no-any-return]
            except redis.exceptions.OutOfMemoryError:
                with self.channel.conn_or_acquire() as client:
                    wait_for_room(client, "a message taken from the queue waits", attempt)
                attempt += 1

    def _restore_visible(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            restore_visible(self, *args, **kwargs)
        except redis.exceptions.OutOfMemoryError:
            with self.channel.conn_or_acquire() as client:
                logging.getLogger("medq.worker").warning(
                    "%s: skipped the sweep for unacknowledged messages; it runs again later", full_message(client)
                )

    _append.medq_patched = True  # type: ignore[attr-defined]
    kombu_redis.QoS.append = _append  # type: ignore[method-assign]
    kombu_redis.QoS.restore_visible = _restore_visible  # type: ignore[method-assign]
    kombu_redis.QoS._remove_from_indices = _remove_from_indices_  # type: ignore[method-assign]
