"""medq: private, queue-based extraction of structured data from clinical notes.

Packages:
- ``medq``      what both sides share: settings, the job contract, schemas, errors, the CLI.
- ``producer``  enqueues jobs; needs only celery, redis and pydantic(-settings).
- ``worker``    the Celery app, the task and the ``MedicalDataProcessor``.
"""

__version__ = "0.1.0"
