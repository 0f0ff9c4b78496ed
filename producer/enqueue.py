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
from typing import Any

import redis
from celery import Celery

from medq.contract import QUEUE, TASK_EXTRACT, TASK_EXTRACT_MANY, batch_key, job_key, make_job_id, payload_key
from medq.crypto import Sealer, seal_text
from medq.schemas import ExtractionSchema, SchemaLoader
from medq.settings import Settings, get_settings
from producer.records import CheckedRecords, InputError, Record, check, from_objects

# Create a job only if it does not exist, all at once, so a crash cannot leave half a job.
# KEYS[1] job hash, KEYS[2] payload string, KEYS[3] batch set, KEYS[4] (optional) a staged
# upload: a hash of payloads parked there while the rest of the upload arrived
# ARGV[1] batch, ARGV[2] record id, ARGV[3] schema, ARGV[4] schema version,
# ARGV[5] now (iso), ARGV[6] payload JSON (or, with KEYS[4], its field there),
# ARGV[7] payload TTL seconds, ARGV[8] job id, ARGV[9] position in the input (results are
# exported in input order)
# Returns 1 if created, 2 if it exists but its message may never have been sent, 0 otherwise,
# -1 if the staged payload is gone (the upload expired).
CREATE_JOB_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'sent') then return 0 end
  return 2
end
local payload = ARGV[6]
if KEYS[4] then
  payload = redis.call('HGET', KEYS[4], ARGV[6])
  if not payload then return -1 end
end
redis.call('HSET', KEYS[1], 'batch', ARGV[1], 'record_id', ARGV[2], 'schema', ARGV[3],
           'schema_version', ARGV[4], 'status', 'queued', 'attempts', 0, 'enqueued_at', ARGV[5],
           'updated_at', ARGV[5], 'seq', ARGV[9])
redis.call('SET', KEYS[2], payload, 'EX', ARGV[7])
redis.call('SADD', KEYS[3], ARGV[8])
return 1
"""

_CHUNK = 128  # jobs written per round trip, then sent; a multiple of MEDQ_JOBS_PER_MESSAGE's default


class EnqueueResult(list[str]):
    """The job ids, in input order, with what happened to them."""

    def __init__(self, batch: str, job_ids: list[str], created: int, sent: int) -> None:
        super().__init__(job_ids)
        self.batch = batch
        self.created = created  # new jobs
        self.sent = sent  # messages sent (new jobs, and old ones whose message was never sent)

    @property
    def existing(self) -> int:
        return len(self) - self.created


class Producer:
    """Holds the connections; reuse one for many ``enqueue`` calls."""

    def __init__(self, settings: Settings | None = None, schema_loader: SchemaLoader | None = None) -> None:
        self.settings = settings or get_settings()
        self.schema_loader = schema_loader or SchemaLoader(self.settings.schema_dirs)
        self.r = redis.Redis.from_url(self.settings.redis_url)
        self.sealer = Sealer.from_settings(self.settings)  # MEDQ_ENCRYPTION_KEY: records encrypted at rest
        self._create = self.r.register_script(CREATE_JOB_LUA)
        self.celery = Celery("medq-producer", broker=self.settings.redis_url)
        self.celery.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_transport_options=self.settings.broker_transport_options,
            broker_connection_retry_on_startup=True,
        )

    def check(self, records: Iterable[Any] | CheckedRecords) -> CheckedRecords:
        if isinstance(records, CheckedRecords):
            return records
        return check(from_objects(records), self.settings.max_record_bytes)

    def enqueue(
        self,
        records: Iterable[Any] | CheckedRecords,
        schema: str,
        batch: str | None = None,
        *,
        skip_invalid: bool = False,
    ) -> EnqueueResult:
        """Validate ``records`` and enqueue one job per record. Raises ``UnknownSchema``,
        or ``InputError`` (nothing enqueued) when a record is bad and ``skip_invalid`` is off."""
        sch = self.schema_loader.get(schema)
        checked = self.check(records)
        if checked.problems and not skip_invalid:
            raise InputError(checked.problems)
        batch = batch or default_batch_id(checked.records, sch.name, sch.version)
        return self.write_jobs(batch, sch, ((rec.id, sealed_payload(rec, self.sealer)) for rec in checked.records))

    def write_jobs(
        self, batch: str, sch: ExtractionSchema, items: Iterable[tuple[str, str]], staged: str | None = None
    ) -> EnqueueResult:
        """Create a job per ``(record id, payload)`` and send it, 128 at a time. With
        ``staged``, each payload is instead the field of that hash where it was parked."""
        job_ids: list[str] = []
        created = sent = 0
        now_iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        extra_keys = [staged] if staged else []
        seq = 0
        for chunk in _chunks(items, _CHUNK):
            ids = [make_job_id(batch, rid, sch.name, sch.version) for rid, _ in chunk]
            pipe = self.r.pipeline(transaction=False)
            for (rid, payload), job_id in zip(chunk, ids):
                self._create(
                    keys=[job_key(job_id), payload_key(job_id), batch_key(batch), *extra_keys],
                    args=[batch, rid, sch.name, sch.version, now_iso, payload, self.settings.payload_ttl_s, job_id, seq],
                    client=pipe,
                )
                seq += 1
            to_send = []
            for job_id, outcome in zip(ids, pipe.execute()):
                if outcome == -1:
                    raise UploadExpired(f"the upload's staged records expired before batch {batch} was written")
                created += outcome == 1
                if outcome:
                    to_send.append(job_id)
            # Sent chunk by chunk: workers start on the first jobs while the rest are written.
            self.send(to_send)
            sent += len(to_send)
            job_ids += ids
        return EnqueueResult(batch, job_ids, created, sent)

    def send(self, job_ids: list[str]) -> None:
        """Send the task messages, then mark the jobs as sent (so a re-run resends the rest).

        ``MEDQ_JOBS_PER_MESSAGE`` jobs go in one ``medq.extract_many`` message; a lone
        job goes as ``medq.extract``, as another service would send it."""
        if not job_ids:
            return
        per = max(self.settings.jobs_per_message, 1)
        with self.celery.producer_or_acquire() as producer:
            for i in range(0, len(job_ids), _CHUNK):
                chunk = job_ids[i : i + _CHUNK]
                for j in range(0, len(chunk), per):
                    group = chunk[j : j + per]
                    if len(group) == 1:
                        self.celery.send_task(TASK_EXTRACT, args=[group[0]], task_id=group[0], queue=QUEUE, producer=producer)
                    else:
                        self.celery.send_task(TASK_EXTRACT_MANY, args=[group], queue=QUEUE, producer=producer)
                pipe = self.r.pipeline(transaction=False)
                for job_id in chunk:
                    pipe.hset(job_key(job_id), "sent", 1)
                pipe.execute()

    def close(self) -> None:
        self.r.close()


def sealed_payload(rec: Record, sealer: Sealer | None = None) -> str:
    """What is stored under the payload key: the record as JSON, sealed when a key is set."""
    return seal_text(json.dumps({"text": rec.text, "metadata": rec.metadata}, ensure_ascii=False), sealer)


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


class UploadExpired(RuntimeError):
    """Staged records were gone when their jobs were written (the upload outlived its TTL)."""


def _chunks(items: Iterable[tuple[str, str]], n: int) -> Iterator[list[tuple[str, str]]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def enqueue(
    records: Iterable[Any],
    schema: str,
    batch: str | None = None,
    *,
    skip_invalid: bool = False,
    settings: Settings | None = None,
) -> EnqueueResult:
    """Enqueue records (dicts with ``id``, ``text``, optional ``metadata``) -> job ids.

    The returned list also has ``.batch``, ``.created`` and ``.existing``.
    """
    producer = Producer(settings)
    try:
        return producer.enqueue(records, schema, batch, skip_invalid=skip_invalid)
    finally:
        producer.close()
