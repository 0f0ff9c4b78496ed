"""Enqueue records: store each payload under its job id, send only the id.

Needs celery, redis and pydantic only; never imports ``worker`` (another service
must be able to enqueue without the worker's dependencies).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple, TypeVar

import redis
from celery import Celery

from medq.core.contract import is_valid_batch_id
from medq.core.crypto import Sealer, seal_text
from medq.core.errors import InputError, InvalidBatchId, RedisFull, UploadExpired
from medq.core.schemas import ExtractionSchema, SchemaLoader
from medq.core.settings import Settings, get_settings
from medq.state.broker import celery_broker_conf
from medq.state.connect import connect
from medq.state.dispatch import send_jobs
from medq.state.jobs import CreateOutcome, JobDefaults, create_jobs, mark_sent
from medq.state.memory import full_message
from producer.records import CheckedRecords, Record, check, from_objects, limits_of

_T = TypeVar("_T")
_CHUNK = 128  # jobs written per round trip, then sent; a multiple of MEDQ_JOBS_PER_MESSAGE's default


class JobItem(NamedTuple):
    """What ``write_jobs`` makes a job of: a checked record as it is stored (``Producer.job_item``)."""

    record_id: str
    payload: str  # the record as JSON, sealed when MEDQ_ENCRYPTION_KEY is set
    digest: str  # tells a corrected record from the same one sent again (record_digest)


class EnqueueResult(list[str]):
    """The job ids, in input order, with what happened to them.

    ``conflicts``: ids of records the batch already holds with another text (or metadata);
    their new text was not enqueued, and their job id in the list is the one already there.
    ``replaced``: ids of records whose new text was enqueued as a new revision (``replace``)."""

    def __init__(
        self, batch: str, job_ids: list[str], created: int, sent: int,
        conflicts: list[str] | None = None, replaced: list[str] | None = None,
    ) -> None:
        super().__init__(job_ids)
        self.batch = batch
        self.created = created  # new jobs of records the batch did not hold
        self.sent = sent  # messages sent (new jobs, revisions, and old ones whose message was never sent)
        self.conflicts = conflicts or []
        self.replaced = replaced or []

    @property
    def existing(self) -> int:
        """Records the batch already held with the same text: nothing new runs for them."""
        return len(self) - self.created - len(self.conflicts) - len(self.replaced)


class Producer:
    """Holds the connections; reuse one for many ``enqueue`` calls."""

    def __init__(self, settings: Settings | None = None, schema_loader: SchemaLoader | None = None) -> None:
        self.settings = settings or get_settings()
        self.schema_loader = schema_loader or SchemaLoader(self.settings.schema_dirs)
        self.r = connect(self.settings.redis_url)
        self.sealer = Sealer.from_settings(self.settings)  # MEDQ_ENCRYPTION_KEY: records encrypted at rest
        # The broker (MEDQ_BROKER_URL, default the Redis URL) and its queue, as the workers see them.
        self.celery = Celery("medq-producer")
        self.celery.conf.update(celery_broker_conf(self.settings), task_serializer="json", accept_content=["json"])

    def check(self, records: Iterable[Any] | CheckedRecords) -> CheckedRecords:
        if isinstance(records, CheckedRecords):
            return records
        return check(from_objects(records), **limits_of(self.settings))

    def job_item(self, rec: Record, hasher: BatchHasher | None = None) -> JobItem:
        """A checked record as its job stores it: its digest (taken before sealing), its
        payload sealed with MEDQ_ENCRYPTION_KEY, and, given the ``hasher`` of a batch whose
        id is derived from its records, hashed into that id. The one place a record becomes
        a job, for ``enqueue`` (the CLI), ``POST /v1/jobs`` and uploads; ``write_jobs``
        then creates and sends the jobs."""
        if hasher is not None:
            hasher.add(rec)
        return JobItem(rec.id, sealed_payload(rec, self.sealer), record_digest(rec))

    def enqueue(
        self,
        records: Iterable[Any] | CheckedRecords,
        schema: str,
        batch: str | None = None,
        *,
        skip_invalid: bool = False,
        replace: bool = False,
    ) -> EnqueueResult:
        """Validate ``records`` and enqueue one job per record. Raises ``UnknownSchema``,
        or ``InputError`` (nothing enqueued) when a record is bad and ``skip_invalid`` is off.
        A record the batch already holds with another text is listed in ``conflicts`` and
        not enqueued; with ``replace`` it runs again as a new revision instead."""
        sch = self.schema_loader.get(schema)
        checked = self.check(records)
        if checked.problems and not skip_invalid:
            raise InputError(checked.problems)
        # The batch id is hashed ahead (the records are all in memory): the first chunk is
        # written with it before the last record is sealed.
        batch = batch or default_batch_id(checked.records, sch.name, sch.version)
        items = (self.job_item(rec) for rec in checked.records)
        return self.write_jobs(batch, sch, items, replace=replace)

    def write_jobs(
        self, batch: str, sch: ExtractionSchema, items: Iterable[tuple[str, str, str]], staged: str | None = None,
        *, replace: bool = False,
    ) -> EnqueueResult:
        """Create a job per ``(record id, payload, digest)`` and send it, 128 at a time. With
        ``staged``, each payload is instead the field of that hash where it was parked."""
        check_batch_id(batch)
        job_ids: list[str] = []
        conflicts: list[str] = []
        replaced: list[str] = []
        created = sent = 0
        run = JobDefaults(
            batch, sch.name, sch.version, time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            self.settings.payload_ttl_s, self.settings.results_ttl_s, replace=replace, staged=staged,
        )
        seq = 0
        for chunk in _chunks(items, _CHUNK):
            try:
                outcomes = create_jobs(self.r, run, chunk, seq)
            except redis.exceptions.OutOfMemoryError:
                raise self._full(batch, sent) from None
            seq += len(chunk)
            to_send = []
            for (rid, _, _), (outcome, job_id) in zip(chunk, outcomes, strict=True):
                if outcome == CreateOutcome.STAGED_GONE:
                    raise UploadExpired(f"the upload's staged records expired before batch {batch} was written")
                created += outcome == CreateOutcome.CREATED
                if outcome == CreateOutcome.CONFLICT:
                    conflicts.append(rid)
                elif outcome == CreateOutcome.REPLACED:
                    replaced.append(rid)
                if outcome in (CreateOutcome.CREATED, CreateOutcome.UNSENT, CreateOutcome.REPLACED):
                    to_send.append(job_id)
                job_ids.append(job_id)
            # Sent chunk by chunk: workers start on the first jobs while the rest are written.
            try:
                self.send(to_send)
            except redis.exceptions.OutOfMemoryError:
                raise self._full(batch, sent) from None
            sent += len(to_send)
        return EnqueueResult(batch, job_ids, created, sent, conflicts, replaced)

    def _full(self, batch: str, sent: int) -> RedisFull:
        # Jobs written but not sent stay marked unsent (CreateOutcome.UNSENT): the same
        # enqueue run again sends their messages, and the ones already sent are not sent twice.
        return RedisFull(
            f"{full_message(self.r)}: {sent} job(s) of batch {batch} were enqueued before it filled, the rest were "
            "not sent; free memory or raise maxmemory, then run the same command again: it sends the rest "
            "(records already enqueued are not enqueued twice)",
            sent,
        )

    def send(self, job_ids: list[str]) -> None:
        """Send the task messages, then mark the jobs as sent (so a re-run resends the rest).

        ``MEDQ_JOBS_PER_MESSAGE`` jobs go in one ``medq.extract_many`` message; a lone
        job goes as ``medq.extract``, as another service would send it."""
        if not job_ids:
            return
        with self.celery.producer_or_acquire() as producer:
            for i in range(0, len(job_ids), _CHUNK):
                chunk = job_ids[i : i + _CHUNK]
                send_jobs(self.celery, chunk, per_message=self.settings.jobs_per_message, producer=producer)
                mark_sent(self.r, chunk)

    def close(self) -> None:
        self.r.close()


def check_batch_id(batch: str) -> None:
    """Raise ``InvalidBatchId`` unless ``batch`` matches ``BATCH_ID_PATTERN``. The id goes
    into job ids and key names: a control character in it could make two records' job
    ids meet (see ``make_job_id``), and a megabyte of it would be copied into every job."""
    if not is_valid_batch_id(batch):
        shown = repr(batch[:40]) + ("..." if len(batch) > 40 else "") if isinstance(batch, str) else type(batch).__name__
        raise InvalidBatchId(
            f"batch id {shown} is not allowed: use 1 to 128 letters, digits and . _ : @ - "
            "starting with a letter or digit"
        )


def sealed_payload(rec: Record, sealer: Sealer | None = None) -> str:
    """What is stored under the payload key: the record as JSON, sealed when a key is set."""
    return seal_text(json.dumps({"text": rec.text, "metadata": rec.metadata}, ensure_ascii=False), sealer)


def record_digest(rec: Record) -> str:
    """What tells a corrected record from the same one sent again: SHA-256 (32 hex digits)
    of its text and metadata, taken before sealing (a sealed payload differs every time).
    Keys sorted, so the same metadata in another order is the same record."""
    raw = json.dumps({"text": rec.text, "metadata": rec.metadata}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]


def default_batch_id(records: list[Record], schema: str, version: int) -> str:
    """Derived from the content, so enqueuing the same file twice lands in the same batch."""
    h = BatchHasher(schema, version)
    for rec in records:
        h.add(rec)
    return h.batch_id()


class BatchHasher:
    """The content-derived batch id, built record by record. ``salt`` (``medq api``'s
    client name) keeps two clients who send the same records in batches of their own."""

    def __init__(self, schema: str, version: int, salt: str = "") -> None:
        self._h = hashlib.sha256(f"{schema}\x1f{version}".encode() + (b"\x1d" + salt.encode() if salt else b""))

    def add(self, rec: Record) -> None:
        self._h.update(b"\x1e" + rec.id.encode() + b"\x1f" + rec.text.encode())

    def batch_id(self) -> str:
        return "b-" + self._h.hexdigest()[:12]


def _chunks(items: Iterable[_T], n: int) -> Iterator[list[_T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def enqueue(
    records: Iterable[Any],
    schema: str,
    batch: str | None = None,
    *,
    skip_invalid: bool = False,
    replace: bool = False,
    settings: Settings | None = None,
) -> EnqueueResult:
    """Enqueue records (dicts with ``id``, ``text``, optional ``metadata``) -> job ids.

    The returned list also has ``.batch``, ``.created``, ``.existing`` and ``.conflicts``:
    the ids of records the batch already holds with another text, whose new text was NOT
    enqueued (check it: nothing is raised). ``replace=True`` runs those again with the new
    text, as a new revision of the record (new job id, listed in ``.replaced``) that takes
    the old job's place in the batch and its results.
    """
    producer = Producer(settings)
    try:
        return producer.enqueue(records, schema, batch, skip_invalid=skip_invalid, replace=replace)
    finally:
        producer.close()
