"""Encryption at rest for record payloads and results (Fernet, from ``cryptography``).

``MEDQ_ENCRYPTION_KEY`` holds one or more Fernet keys, comma-separated
(``Fernet.generate_key()``, or ``medq keygen``). The first key encrypts; every key
decrypts, so a key is rotated by putting the new one first and keeping the old one
after it until the data written under it has expired (``MultiFernet``).

A sealed value is ``medq-fernet:`` + a Fernet token. Values without the prefix are
read as they are: data written before a key was set stays readable. A result keeps
its job id, record id, batch and status in clear (ids only, see CONTRACT) and the
whole document sealed, so the result stores can still keep the first success.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from medq.core.errors import PermanentError

PREFIX = "medq-fernet:"
_CLEAR_FIELDS = ("job_id", "id", "batch", "schema", "schema_version", "status")


class EncryptionKeyError(PermanentError):
    """Encrypted data and no key, or no key that opens it."""

    kind = "encryption_key"


class Sealer:
    def __init__(self, keys: list[str]) -> None:
        try:
            self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])
        except (ValueError, TypeError):
            raise EncryptionKeyError(
                "MEDQ_ENCRYPTION_KEY must be Fernet keys (32 url-safe base64 bytes each), comma-separated; "
                "make one with `medq keygen`"
            ) from None

    @classmethod
    def from_settings(cls, settings: Any) -> Sealer | None:
        secret = settings.encryption_key
        keys = [k.strip() for k in secret.get_secret_value().split(",") if k.strip()] if secret else []
        return cls(keys) if keys else None

    def seal(self, text: str) -> str:
        return PREFIX + self._fernet.encrypt(text.encode("utf-8")).decode("ascii")

    def open(self, value: str) -> str:
        try:
            return self._fernet.decrypt(value[len(PREFIX) :].encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise EncryptionKeyError(
                "stored data was encrypted with a key that is not in MEDQ_ENCRYPTION_KEY "
                "(after a rotation, keep the old key after the new one)"
            ) from None


def seal_text(text: str, sealer: Sealer | None) -> str:
    return sealer.seal(text) if sealer else text


def open_text(value: str, sealer: Sealer | None, what: str) -> str:
    """``value`` in clear; raises :class:`EncryptionKeyError` naming ``what`` if it cannot."""
    if not value.startswith(PREFIX):
        return value
    if sealer is None:
        raise EncryptionKeyError(f"{what} is encrypted: set MEDQ_ENCRYPTION_KEY to read it")
    return sealer.open(value)


def seal_doc(doc: dict[str, Any], sealer: Sealer | None) -> dict[str, Any]:
    """A result as stored: ids and status in clear, the whole document sealed."""
    if sealer is None:
        return doc
    return {**{k: doc.get(k) for k in _CLEAR_FIELDS}, "sealed": sealer.seal(json.dumps(doc, ensure_ascii=False))}


def open_doc(stored: dict[str, Any], sealer: Sealer | None) -> dict[str, Any]:
    if "sealed" not in stored:
        return stored
    doc: dict[str, Any] = json.loads(open_text(stored["sealed"], sealer, f"the result of job {stored.get('job_id')}"))
    return doc
