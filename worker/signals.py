"""The worker's Celery signal handlers: start-up checks, the queues of its schema versions, the
engine made at start, quiet SDK loggers.

Imported by ``worker.tasks`` (which the worker loads before it sends ``worker_init``), so
``celery -A worker.celery_app worker`` registers them; the app is passed to the engine,
which never imports ``worker.celery_app`` itself.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import redis
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    task_postrun,
    task_received,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)

from medq.core.contract import TASK_EXTRACT, TASK_EXTRACT_MANY, schema_queue
from medq.core.crypto import Sealer
from medq.core.errors import MedqError, SchemaError  # MedqError: RemoteEndpointRefused among them
from medq.core.privacy import check_endpoints
from medq.core.schemas import SchemaLoader
from medq.state.connect import connect
from medq.state.memory import probe_write, wait_for_room
from worker.celery_app import app, settings
from worker.engine import get_engine, running_engine
from worker.llm.model_check import ModelStatus, check_models

log = logging.getLogger("medq.worker")


@worker_init.connect
def _check_config(**_: Any) -> None:
    """Fail at start, not at the first job: the encryption key must be well-formed, every
    endpoint must pass the privacy guard and serve its model, and at least one schema must
    load. A bad schema file is reported here with its file and line or field, and the
    worker serves the others (its jobs wait for a worker that has it). Celery logs and
    ignores an exception from a signal handler, so a failed check ends the process itself."""
    try:
        _report_schema_problems(SchemaLoader(settings.schema_dirs))
        Sealer.from_settings(settings)  # a malformed MEDQ_ENCRYPTION_KEY fails here, not per job
        check_endpoints(
            [ep.url for ep in settings.llm.all_endpoints], settings.llm.allowed_hosts, settings.allow_remote_llm
        )
    except MedqError as exc:
        log.critical("medq worker cannot start: %s", exc)
        print(f"medq worker cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    _check_models()  # after the privacy guard: never probe an endpoint it refuses


@worker_init.connect
def _wait_for_room(**_: Any) -> None:
    """Start on a full Redis without dying: Celery's start-up writes (queue bindings, the
    hello to other workers) raise ``OutOfMemoryError`` out of the consumer. Wait until a
    tiny write succeeds, saying why (the messages and jobs stay in Redis meanwhile)."""
    client = connect(settings.redis_url)
    attempt = 0
    try:
        while True:
            try:
                probe_write(client)
                return
            except redis.exceptions.OutOfMemoryError:
                wait_for_room(client, "the worker waits to start", attempt)
                attempt += 1
            except redis.RedisError:
                return  # unreachable: Celery's own connection retries say so
    finally:
        client.close()


@celeryd_after_setup.connect
def _take_schema_queues(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Besides ``medq``, take the queue of every schema version this worker has loaded: a
    worker without a job's version hands the job on there (``worker.runner``), so it comes
    only to workers that can run it. (Celery's documented way to add a worker's queues.)"""
    for name, version in SchemaLoader(settings.schema_dirs).pairs():
        instance.app.amqp.queues.select_add(schema_queue(name, version))


def _report_schema_problems(loader: SchemaLoader) -> None:
    for problem in loader.problems:
        log.error("schema %s is not available: %s", problem.name, problem.message)
        print(f"medq worker: schema {problem.name} is not available: {problem.message}", file=sys.stderr, flush=True)
    if loader.problems and not loader.names():
        raise SchemaError("no schema could be loaded; fix the files above")


def _check_models() -> None:
    """A model the endpoint does not serve would fail every job (``model_not_found``):
    refuse to start and say what to change. An endpoint that does not answer yet only
    gets a warning: it may come up after the workers (a compose start, a restart)."""
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
    get_engine(app)


@worker_ready.connect
def _start_engine(sender: Any = None, **_: Any) -> None:
    """Threads and solo pools: the engine starts with the worker, not with its first job,
    so its sweeps for lost jobs run on an idle worker too. (Prefork: each child's, above.)"""
    pool = getattr(sender, "pool", None)
    if pool is not None and "prefork" in type(pool).__module__:
        return
    get_engine(app)


@task_received.connect
def _hold_received(request: Any = None, **_: Any) -> None:
    """A message reached this worker: its jobs are heard of (``worker.leases``) while it
    waits for its countdown or a free pool thread, so the orphan sweep does not send them
    again. (Prefork: the parent holds the messages but runs no engine; its jobs are
    heard of once a child runs them.)"""
    engine = running_engine()
    ids = _job_ids(getattr(request, "name", ""), getattr(request, "args", None))
    if engine is not None and ids:
        engine.reserve(ids)


@worker_shutting_down.connect
def _stop_taking(**_: Any) -> None:
    """A warm shutdown (SIGTERM, ``--burst`` done or stopped): the jobs of the held messages
    that are still in line for the model go back to the broker now, uncharged, so the
    shutdown waits only for the calls under way (a one-slot server's line can be minutes)."""
    engine = running_engine()
    if engine is not None:
        engine.stop_taking()


@task_postrun.connect
def _release_received(task: Any = None, args: Any = None, **_: Any) -> None:
    engine = running_engine()
    ids = _job_ids(getattr(task, "name", ""), args)
    if engine is not None and ids:
        engine.unreserve(ids)


def _job_ids(name: str, args: Any) -> list[str]:
    """The job ids a medq task message carries (ids only, CONTRACT)."""
    if not args:
        return []
    if name == TASK_EXTRACT:
        return [str(args[0])]
    if name == TASK_EXTRACT_MANY and isinstance(args[0], (list, tuple)):
        return [str(j) for j in args[0]]
    return []


@after_setup_logger.connect
@after_setup_task_logger.connect
def _quiet_sdk_loggers(**_: Any) -> None:
    # The openai SDK logs whole request bodies, i.e. the note, at DEBUG.
    for name in ("openai", "openai._base_client"):
        logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.INFO))
