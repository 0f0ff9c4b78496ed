"""The one Celery app. ``celery -A worker.celery_app worker`` and ``medq worker`` run it."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_process_init,
    worker_ready,
)

from medq.core.contract import QUEUE
from medq.core.settings import get_settings

settings = get_settings()


def _keep_broker_params_for_restore() -> None:
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
    from kombu.transport import redis as kombu_redis

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


_keep_broker_params_for_restore()


def _wait_while_redis_full() -> None:
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
    import redis
    from kombu.transport import redis as kombu_redis

    from medq.state.memory import full_message, wait_for_room

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


_wait_while_redis_full()

app = Celery("medq", broker=settings.redis_url, backend=settings.redis_url, include=["worker.tasks"])
app.conf.update(
    # JSON only: a pickle payload from the broker is code execution.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_default_queue=QUEUE,
    # A job is acknowledged only when it has finished, and put back if its worker dies,
    # so a crash never loses one. One message at a time per slot: jobs are long.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_cancel_long_running_tasks_on_connection_loss=True,
    # Redis redelivers an unacknowledged message after the visibility timeout: that is
    # how the jobs of a killed worker come back. It must outlast the longest run plus
    # the longest retry delay, or a job is handed out twice (the job lease then keeps
    # the second copy from running it). Sweep for such messages every quarter of it
    # (kombu's default sweep is every ~100 s, however short the timeout).
    broker_transport_options=settings.broker_transport_options,
    result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    # No Celery time limit: the engine enforces MEDQ_WORKER__TASK_TIME_LIMIT_S on each
    # job (in every pool), and a message of many jobs must not be killed as a whole.
    result_expires=settings.results_ttl_s,
    broker_connection_retry_on_startup=True,
    # Flower lives on events; they carry ids and PHI-free summaries only.
    worker_send_task_events=True,
    task_send_sent_event=True,
)


@worker_init.connect
def _check_config(**_: Any) -> None:
    """Fail at start, not at the first job: the encryption key must be well-formed, every
    endpoint must pass the privacy guard and serve its model, and at least one schema must
    load. A bad schema file is reported here with its file and line or field, and the
    worker serves the others (its jobs wait for a worker that has it). Celery logs and
    ignores an exception from a signal handler, so a failed check ends the process itself."""
    from medq.core.crypto import Sealer
    from medq.core.errors import MedqError
    from medq.core.privacy import RemoteEndpointRefused, check_endpoints
    from medq.core.schemas import SchemaLoader

    try:
        _report_schema_problems(SchemaLoader(settings.schema_dirs))
        Sealer.from_settings(settings)  # a malformed MEDQ_ENCRYPTION_KEY fails here, not per job
        check_endpoints(
            [ep.url for ep in settings.llm.all_endpoints], settings.llm.allowed_hosts, settings.allow_remote_llm
        )
    except (MedqError, RemoteEndpointRefused) as exc:
        logging.getLogger("medq.worker").critical("medq worker cannot start: %s", exc)
        print(f"medq worker cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    _check_models()  # after the privacy guard: never probe an endpoint it refuses


@worker_init.connect
def _wait_for_room(**_: Any) -> None:
    """Start on a full Redis without dying: Celery's start-up writes (queue bindings, the
    hello to other workers) raise ``OutOfMemoryError`` out of the consumer. Wait until a
    tiny write succeeds, saying why (the messages and jobs stay in Redis meanwhile)."""
    import redis

    from medq.state.memory import wait_for_room

    client = redis.Redis.from_url(settings.redis_url)
    attempt = 0
    try:
        while True:
            try:
                client.set("medq:write-probe", 1, px=1000)
                return
            except redis.exceptions.OutOfMemoryError:
                wait_for_room(client, "the worker waits to start", attempt)
                attempt += 1
            except redis.RedisError:
                return  # unreachable: Celery's own connection retries say so
    finally:
        client.close()


def _report_schema_problems(loader: Any) -> None:
    from medq.core.errors import SchemaError

    for problem in loader.problems:
        logging.getLogger("medq.worker").error("schema %s is not available: %s", problem.name, problem.message)
        print(f"medq worker: schema {problem.name} is not available: {problem.message}", file=sys.stderr, flush=True)
    if loader.problems and not loader.names():
        raise SchemaError("no schema could be loaded; fix the files above")


def _check_models() -> None:
    """A model the endpoint does not serve would fail every job (``model_not_found``):
    refuse to start and say what to change. An endpoint that does not answer yet only
    gets a warning: it may come up after the workers (a compose start, a restart)."""
    from worker.llm.model_check import ModelStatus, check_models

    log = logging.getLogger("medq.worker")
    checks = check_models(settings)
    for check in checks:
        if check.status is ModelStatus.UNREACHABLE:
            log.warning("cannot reach %s to check model %s; starting anyway, jobs wait for it", check.url, check.model)
        elif check.status is ModelStatus.UNCONFIRMED:
            log.warning("%s did not confirm model %s (%s); starting anyway", check.url, check.model, check.reason)
    wrong = [check.problem() for check in checks if check.status is ModelStatus.NOT_SERVED]
    if wrong:
        for problem in wrong:
            log.error("medq worker cannot start: %s", problem)
            print(f"medq worker cannot start: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    # One engine (event loop, Redis and HTTP clients, compiled schemas) per worker
    # process, made at start.
    from worker.jobs import get_engine

    get_engine()


@worker_ready.connect
def _start_engine(sender: Any = None, **_: Any) -> None:
    """Threads and solo pools: the engine starts with the worker, not with its first job,
    so its sweeps for lost jobs run on an idle worker too. (Prefork: each child's, above.)"""
    pool = getattr(sender, "pool", None)
    if pool is not None and "prefork" in type(pool).__module__:
        return
    from worker.jobs import get_engine

    get_engine()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _quiet_sdk_loggers(**_: Any) -> None:
    # The openai SDK logs whole request bodies, i.e. the note, at DEBUG.
    for name in ("openai", "openai._base_client"):
        logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.INFO))
