"""Bundled sample records with hand-checked gold labels, one pair of files per schema.

``NAME.jsonl`` holds input records in the CONTRACT.md format
(``{"id", "text", "metadata": {"lang", "setting"}}``) and ``NAME.gold.jsonl`` holds
``{"id", "data"}`` where ``data`` follows schema NAME exactly. Every note is
fictional and was written for medq. ``medq demo`` enqueues the records and scores
the results against the gold labels with ``medq.tools.evaluate``.
"""

from __future__ import annotations

from pathlib import Path

SAMPLES_DIR = Path(__file__).parent


def _existing(path: Path, schema: str) -> Path:
    # Fail with the choices named: a typo in --schema should not surface later as
    # an empty batch or a bare FileNotFoundError from deep inside the demo.
    if not path.is_file():
        raise FileNotFoundError(
            f"no bundled samples for schema {schema!r}; available: {', '.join(available()) or 'none'}"
        )
    return path


def available() -> list[str]:
    """Names of the schemas that have bundled sample records."""
    return sorted(p.name[: -len(".jsonl")] for p in SAMPLES_DIR.glob("*.jsonl") if not p.name.endswith(".gold.jsonl"))


def sample_path(schema: str) -> Path:
    """The bundled JSONL records file for ``schema``."""
    return _existing(SAMPLES_DIR / f"{schema}.jsonl", schema)


def gold_path(schema: str) -> Path:
    """The bundled gold labels (``{"id", "data"}`` per line) for ``schema``."""
    return _existing(SAMPLES_DIR / f"{schema}.gold.jsonl", schema)
