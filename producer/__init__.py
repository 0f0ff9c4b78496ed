"""Enqueue medq jobs from any Python service: ``from producer import enqueue``.

Needs only celery, redis and pydantic (plus pydantic-settings and PyYAML, which
read the settings and schema names); never the worker's LLM stack.
"""

from medq.core.errors import InputError
from producer.enqueue import EnqueueResult, Producer, enqueue
from producer.records import Record, RecordProblem

__all__ = ["EnqueueResult", "InputError", "Producer", "Record", "RecordProblem", "enqueue"]
