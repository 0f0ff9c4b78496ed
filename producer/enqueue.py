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
from typing import Any, TypeVar

import redis
from celery import Celery

from medq.core.contract import (
    QUEUE, TASK_EXTRACT, TASK_EXTRACT_MANY, batch_key, failed_key, is_valid_batch_id, job_key, make_job_id,
    payload_key,
)
from medq.core.crypto import Sealer, seal_text
from medq.core.errors import InvalidBatchId, RedisFull
from medq.state.memory import full_message
from medq.core.schemas import ExtractionSchema, SchemaLoader
from medq.core.settings import Settings, get_settings
from producer.records import CheckedRecords, InputError, Record, check, from_objects, limits_of

# Create a job only if its record is not in the batch yet, all at once, so a crash cannot
# leave half a job. A record already there is compared by digest with its newest revision:
# the same record is left alone; another text is a conflict, or with ``replace`` a new
# revision that takes the old one's place in the batch (see medq.core.contract.revision_job_id).
# KEYS[1] the record's first job hash, KEYS[2] its payload string, KEYS[3] batch set,
# KEYS[4] failed set, KEYS[5] (optional) a staged upload: a hash of payloads parked there
# while the rest of the upload arrived
# ARGV[1] batch, ARGV[2] record id, ARGV[3] schema, ARGV[4] schema version,
# ARGV[5] now (iso), ARGV[6] payload JSON (or, with KEYS[5], its field there),
# ARGV[7] payload TTL seconds, ARGV[8] the first job id, ARGV[9] position in the input
# (results are exported in input order), ARGV[10] the record's digest, ARGV[11] "1" to
# replace a conflicting record, ARGV[12] job key prefix, ARGV[13] payload key prefix,
# ARGV[14] TTL seconds of a replaced revision's marker
# A revision's keys are named here from the prefixes: which revision is current is only
# known inside the script.
# Returns {outcome, job id of the record's current job}: outcome 1 created, 2 exists but
# its message may never have been sent, 0 exists, 3 conflict (nothing written), 4 replaced
# by a new revision, -1 the staged payload is gone (the upload expired).
CREATE_JOB_LUA = """
local function payload()
  if KEYS[5] then return redis.call('HGET', KEYS[5], ARGV[6]) end
  return ARGV[6]
end
local function create(job_id, p)
  redis.call('HSET', ARGV[12] .. job_id, 'batch', ARGV[1], 'record_id', ARGV[2], 'schema', ARGV[3],
             'schema_version', ARGV[4], 'status', 'queued', 'attempts', 0, 'enqueued_at', ARGV[5],
             'updated_at', ARGV[5], 'seq', ARGV[9], 'digest', ARGV[10])
  redis.call('SET', ARGV[13] .. job_id, p, 'EX', ARGV[7])
  redis.call('SADD', KEYS[3], job_id)
end
local first = ARGV[8]
if redis.call('EXISTS', KEYS[1]) == 0 then
  local p = payload()
  if not p then return {-1, first} end
  create(first, p)
  return {1, first}
end
local cur = redis.call('HGET', KEYS[1], 'superseded_by') or first
local cur_key = ARGV[12] .. cur
-- A new revision of the record takes the place of its current job `cur`.
local function revise(outcome)
  local p = payload()
  if not p then return {-1, cur} end
  local new = first .. '-r' .. redis.call('HINCRBY', KEYS[1], 'revisions', 1)  -- revision_job_id
  create(new, p)
  -- The old job leaves the batch and its dead letters and its note goes; its hash stays as
  -- a marker, so a delivery of it still in the queue finds it superseded and does nothing.
  redis.call('SREM', KEYS[3], cur)
  redis.call('ZREM', KEYS[4], cur)
  redis.call('DEL', ARGV[13] .. cur)
  if cur ~= first and redis.call('EXISTS', cur_key) == 1 then
    redis.call('HSET', cur_key, 'superseded_by', new)
    redis.call('EXPIRE', cur_key, ARGV[14])
  end
  -- The first job's hash points at the newest revision and lives as long as it does
  -- (the worker gives it the same expiry when that revision succeeds).
  redis.call('HSET', KEYS[1], 'superseded_by', new)
  redis.call('PERSIST', KEYS[1])
  return {outcome, new}
end
local h = redis.call('HMGET', cur_key, 'digest', 'sent', 'status')
-- the newest revision's state expired or was purged apart from its first job: the record
-- is not in the batch; it comes back as a new revision (never under an id that has a result)
if not h[3] then return revise(1) end
-- no digest: written before digests were kept, so it cannot be told apart; taken as the same
if not h[1] or h[1] == ARGV[10] then
  if h[2] then return {0, cur} end
  return {2, cur}
end
if ARGV[11] ~= '1' then return {3, cur} end
return revise(4)
"""

_T = TypeVar("_T")
_CHUNK = 128  # jobs written per round trip, then sent; a multiple of MEDQ_JOBS_PER_MESSAGE's default


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


# CREATE_JOB_LUA's outcomes
_EXISTS, _CREATED, _UNSENT, _CONFLICT, _REPLACED, _STAGED_GONE = 0, 1, 2, 3, 4, -1


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
        return check(from_objects(records), **limits_of(self.settings))

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
        batch = batch or default_batch_id(checked.records, sch.name, sch.version)
        items = ((rec.id, sealed_payload(rec, self.sealer), record_digest(rec)) for rec in checked.records)
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
        now_iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        extra_keys = [staged] if staged else []
        prefixes = [job_key(""), payload_key("")]
        seq = 0
        for chunk in _chunks(items, _CHUNK):
            try:
                outcomes = self._create_chunk(batch, sch, chunk, seq, now_iso, extra_keys, prefixes, replace)
            except redis.exceptions.OutOfMemoryError:
                raise self._full(batch, sent) from None
            seq += len(chunk)
            to_send = []
            for (rid, _, _), (outcome, raw_id) in zip(chunk, outcomes):
                job_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                if outcome == _STAGED_GONE:
                    raise UploadExpired(f"the upload's staged records expired before batch {batch} was written")
                created += outcome == _CREATED
                if outcome == _CONFLICT:
                    conflicts.append(rid)
                elif outcome == _REPLACED:
                    replaced.append(rid)
                if outcome in (_CREATED, _UNSENT, _REPLACED):
                    to_send.append(job_id)
                job_ids.append(job_id)
            # Sent chunk by chunk: workers start on the first jobs while the rest are written.
            try:
                self.send(to_send)
            except redis.exceptions.OutOfMemoryError:
                raise self._full(batch, sent) from None
            sent += len(to_send)
        return EnqueueResult(batch, job_ids, created, sent, conflicts, replaced)

    def _create_chunk(
        self, batch: str, sch: ExtractionSchema, chunk: list[tuple[str, str, str]], seq: int, now_iso: str,
        extra_keys: list[str], prefixes: list[str], replace: bool,
    ) -> list[Any]:
        """CREATE_JOB_LUA for each item of ``chunk``, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for i, (rid, payload, digest) in enumerate(chunk):
            first = make_job_id(batch, rid, sch.name, sch.version)
            self._create(
                keys=[job_key(first), payload_key(first), batch_key(batch), failed_key(batch), *extra_keys],
                args=[batch, rid, sch.name, sch.version, now_iso, payload, self.settings.payload_ttl_s, first, seq + i,
                      digest, int(replace), *prefixes, self.settings.results_ttl_s],
                client=pipe,
            )
        return list(pipe.execute())

    def _full(self, batch: str, sent: int) -> RedisFull:
        # Jobs written but not sent stay marked unsent (CREATE_JOB_LUA outcome 2): the same
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


class UploadExpired(RuntimeError):
    """Staged records were gone when their jobs were written (the upload outlived its TTL)."""


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
