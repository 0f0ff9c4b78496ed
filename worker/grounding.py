"""Grounding check: which extracted values cannot be found in the note.

A small model invents things: ages, drug names, vitals. Every copied value (a
string, or a number) should occur in the source text, so each one that does not
is listed by its path ("medications[1].dose") in the result's provenance, for a
reviewer. Enum values are categories the model chose, not copies, and are not
checked. With ``drop``, ungrounded values are removed: nullable scalars become
null and list items go, which trades recall for precision on tiny models.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

_SPACE = re.compile(r"\s+")


def _norm(s: str) -> str:
    # NFKC folds full-width forms (Chinese input) and ligatures; spaces are dropped
    # entirely so "500mg" matches "500 mg" and Chinese text needs no tokenising.
    return _SPACE.sub("", unicodedata.normalize("NFKC", s).casefold())


def _number_forms(v: float) -> list[str]:
    if isinstance(v, bool):
        return []
    if float(v).is_integer():
        return [str(int(v))]
    return [f"{v:g}", str(v)]


def _grounded(value: Any, haystack: str) -> bool:
    if isinstance(value, str):
        needle = _norm(value)
        return not needle or needle in haystack
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return any(form in haystack for form in _number_forms(value))
    return True


def _walk(value: Any, prop: dict[str, Any], path: str, haystack: str, out: list[str]) -> None:
    if value is None or "enum" in prop:
        return
    if isinstance(value, list):
        items = prop.get("items", {})
        for i, item in enumerate(value):
            _walk(item, items, f"{path}[{i}]", haystack, out)
    elif isinstance(value, dict):
        props = prop.get("properties", {})
        for key, sub in value.items():
            _walk(sub, props.get(key, {}), f"{path}.{key}" if path else key, haystack, out)
    elif not _grounded(value, haystack):
        out.append(path)


def ungrounded_paths(data: dict[str, Any], json_schema: dict[str, Any], text: str) -> list[str]:
    """Paths of the values in ``data`` that do not occur in ``text``."""
    out: list[str] = []
    _walk(data, json_schema, "", _norm(text), out)
    return out


def _nullable(prop: dict[str, Any]) -> bool:
    t = prop.get("type")
    return t == "null" or (isinstance(t, list) and "null" in t) or None in prop.get("enum", [object()])


def drop_ungrounded(data: dict[str, Any], json_schema: dict[str, Any], text: str) -> dict[str, Any]:
    """A copy of ``data`` without the values that do not occur in ``text``."""
    haystack = _norm(text)

    def clean(value: Any, prop: dict[str, Any]) -> tuple[bool, Any]:
        """(keep, cleaned value); keep False means the value is ungrounded and not nullable."""
        if value is None or "enum" in prop:
            return True, value
        if isinstance(value, list):
            items = prop.get("items", {})
            kept = []
            for item in value:
                ok, cleaned = clean(item, items)
                if ok:
                    kept.append(cleaned)
            return True, kept
        if isinstance(value, dict):
            props = prop.get("properties", {})
            out: dict[str, Any] = {}
            for key, sub in value.items():
                ok, cleaned = clean(sub, props.get(key, {}))
                if not ok:
                    return False, None  # a required, non-nullable part is invented: the item goes
                out[key] = cleaned
            return True, out
        if _grounded(value, haystack):
            return True, value
        return (True, None) if _nullable(prop) else (False, None)

    _, cleaned = clean(data, json_schema)
    return cleaned if isinstance(cleaned, dict) else data
