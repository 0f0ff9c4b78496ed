"""The job contract: what producers and workers agree on.

Both sides import this module, never each other. A producer in another service
that cannot install medq can still enqueue by following it: store the payload
under ``payload_key(job_id)``, write the job hash, add the id to the batch set
and send the task named ``TASK_EXTRACT`` with ``args=[job_id]`` (or, for many jobs,
``TASK_EXTRACT_MANY`` with ``args=[[job_id, ...]]``: one message for several jobs,
which the worker runs side by side).

Only ids travel through the broker. Record text lives in the payload key and
nowhere else (STYLE.md, Celery's own advice on large or sensitive arguments).
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import Enum

TASK_EXTRACT = "medq.extract"
TASK_EXTRACT_MANY = "medq.extract_many"
QUEUE = "medq"

KEY_PREFIX = "medq"


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class JobField:
    """The job hash's field names (``job_key``), in one table: the Lua that writes them
    (``medq.state.jobs``) and the Python that reads them agree here.
    Another service that writes job hashes writes these names."""

    # written at enqueue
    BATCH = "batch"
    RECORD_ID = "record_id"
    SCHEMA = "schema"
    SCHEMA_VERSION = "schema_version"
    STATUS = "status"  # a JobStatus value
    ENQUEUED_AT = "enqueued_at"
    UPDATED_AT = "updated_at"
    SEQ = "seq"  # position in the input: results are exported in input order
    DIGEST = "digest"  # of the stored record: a corrected text is told from the same one
    SENT = "sent"  # the task message was sent (an enqueue run again sends the rest)
    REVISIONS = "revisions"  # on a record's first job: revisions made (``revision_job_id``)
    SUPERSEDED_BY = "superseded_by"  # the newer revision of the record that replaced this job
    # written by runs
    ATTEMPTS = "attempts"  # runs that reached the model
    UNSENT_RUNS = "unsent_runs"  # runs put back before any request: deliveries = attempts + these
    FAILURES = "failures"  # charged errors (MEDQ_WORKER__MAX_RETRIES)
    DEFERRALS = "deferrals"  # back-pressure put-backs
    LOST = "lost"  # runs whose worker died (MEDQ_WORKER__MAX_LOST_RUNS)
    # runs whose worker died while it ran among other suspects (``worker.isolation``): not
    # charged, but from then on the job runs alone
    SPARED = "spared"
    # how the last run shared its process: 'n' beside healthy jobs, 'c' among suspects only,
    # 'a' alone (``worker.isolation``; START_LUA reads it when it finds the run's worker dead)
    RUN_MODE = "run_mode"
    RESENT = "resent"  # times the orphan sweep sent it again (its hold doubles each time)
    FIRST_RUN_MS = "first_run_ms"  # when it first ran: MEDQ_WORKER__MAX_WAIT_S counts from here
    LEASE_UNTIL = "lease_until"  # ms: the running delivery's lease
    RUN_ID = "run_id"  # the run that holds the lease
    ERROR_KIND = "error_kind"
    ERROR_MESSAGE = "error_message"  # PHI-free: errors never quote the record


JOB_FIELDS: frozenset[str] = frozenset(v for k, v in vars(JobField).items() if k.isupper())


def job_key(job_id: str) -> str:
    """Hash with the job's PHI-free state: batch, record id, schema, status, attempts, error;
    ``digest`` (of the stored record, to tell a corrected text from the same one) and, on a
    job replaced by a newer revision of its record, ``superseded_by`` (see ``revision_job_id``)."""
    return f"{KEY_PREFIX}:job:{job_id}"


def payload_key(job_id: str) -> str:
    """String with the record payload (JSON ``{"text": ...}``): the only place record text lives."""
    return f"{KEY_PREFIX}:payload:{job_id}"


def batch_key(batch: str) -> str:
    """Set of the job ids in a batch."""
    return f"{KEY_PREFIX}:batch:{batch}"


def failed_key(batch: str) -> str:
    """Sorted set of the batch's dead letters (job ids, scored by when they failed)."""
    return f"{KEY_PREFIX}:failed:{batch}"


def owner_key(batch: str) -> str:
    """String with the ``medq api`` client that created the batch (only it may read it)."""
    return f"{KEY_PREFIX}:owner:{batch}"


def upload_key(upload_id: str) -> str:
    """Hash of the records of a ``medq api`` upload still arriving (field: position), with a TTL."""
    return f"{KEY_PREFIX}:upload:{upload_id}"


def schema_queue(schema: str, version: int) -> str:
    """The broker queue of the jobs of one schema version: every worker that has that version
    loaded takes it besides ``QUEUE``, so a worker without it hands a job on there."""
    return f"{QUEUE}.schema.{schema}.v{version}"


def fleet_key(schema: str) -> str:
    """Sorted set of the live workers that have schema ``schema`` loaded: members
    ``<version>:<worker id>``, scored by when (ms, Redis's clock) the worker's word runs out
    (``medq.state.fleet``)."""
    return f"{KEY_PREFIX}:fleet:{schema}"


WATCH_KEY = f"{KEY_PREFIX}:watch"
"""Sorted set of the unfinished jobs that have started (running, or waiting to retry),
scored by the time (ms) by which something must happen to them again."""


def result_key(job_id: str) -> str:
    """String with the result document when results are kept in Redis."""
    return f"{KEY_PREFIX}:result:{job_id}"


_BATCH_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
BATCH_ID_PATTERN = f"^{_BATCH_ID_RE.pattern}$"
"""What a batch id may be: letters, digits and ``. _ : @ -``, up to 128 characters, starting
with a letter or digit. The default ids (``b-<hex>``, ``demo-<time>-<pid>``) follow it."""


def is_valid_batch_id(batch: object) -> bool:
    return isinstance(batch, str) and _BATCH_ID_RE.fullmatch(batch) is not None


_SEPARATOR = "\x1f"


def make_job_id(batch: str, record_id: str, schema: str, schema_version: int) -> str:
    """Deterministic job id, so enqueuing the same records twice runs nothing twice.

    The parts are joined with ``\\x1f``, which is unambiguous only while no part holds
    that character (batch ``ward\\x1fa`` + record ``b`` would be batch ``ward`` + record
    ``a\\x1fb``). Such parts are encoded as JSON instead (``v2[...]``: JSON escapes the
    separator, so it never equals a joined string), and every other id, i.e. every job
    already in Redis, stays what it was."""
    parts = (batch, record_id, schema, str(schema_version))
    if any(_SEPARATOR in part for part in parts):
        raw = "v2" + json.dumps(list(parts), ensure_ascii=False)
    else:
        raw = _SEPARATOR.join(parts)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]


REVISION_MARK = "-r"


def revision_job_id(base_job_id: str, revision: int) -> str:
    """The job id of a record's ``revision``: a corrected text enqueued with ``--replace``.

    Revision 0 is the record's first job (``make_job_id``); revision n is that id plus
    ``-r<n>``. A revision is a new job id, so the result stores' rule "the first success
    of a job id is kept" still holds, and the batch lists only the newest revision.
    The first job's hash stays as the record's pointer (``superseded_by``: the newest
    revision's id) for as long as that revision lives."""
    return base_job_id if revision == 0 else f"{base_job_id}{REVISION_MARK}{revision}"


def split_revision(job_id: str) -> tuple[str, int]:
    """``(first job id, revision)`` of a job id made by ``revision_job_id``."""
    base, mark, n = job_id.rpartition(REVISION_MARK)
    return (base, int(n)) if mark and n.isdigit() else (job_id, 0)
