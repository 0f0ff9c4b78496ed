"""Answers cut off at ``max_tokens``: tell a model stuck in a loop from a long
honest answer, and keep what a cut-off JSON answer already said.

Small local models sometimes repeat a list item or a phrase until they hit
``max_tokens``. Doubling ``max_tokens`` then only buys a longer loop, minutes
of CPU and a timeout. :func:`is_runaway` decides "stop doubling";
:func:`salvage`, :func:`dedupe_lists` and :func:`complete_missing` turn the
cut-off text into something the caller can validate. All functions are pure.
"""

from __future__ import annotations

import json
import re
from typing import Any

from worker.extract.long_notes import same_key

# A loop is the end of the text repeating itself: a unit of ``p`` characters
# seen at least ``_MIN_REPEATS`` times back to back, over at least
# ``_MIN_LOOP_CHARS`` characters. The span is long so that a few equal values
# in an honest list ("500 mg", "500 mg", ...) never count; a real loop runs on
# to max_tokens and is far longer.
_MIN_REPEATS = 4
_MIN_LOOP_CHARS = 160
_MAX_PERIOD = 1000
# A loop that varies a little ("hypertension", "Hypertension", "essential
# hypertension", ...) is not periodic, but its last list items are few values.
_LAST_ITEMS = 20
_MAX_DISTINCT_ITEMS = 2
_MIN_ITEM_CHARS = 8
_ITEM_SPLIT_RE = re.compile(r"[,;\n]")
_SPACES_RE = re.compile(r"\s+")
# zlib is no use here: honest tables with many nulls compress to 0.09-0.15 of
# their size, as low as loops with a counter ("drug 1", "drug 2", ...).


def is_runaway(content: str) -> bool:
    """True when the end of a cut-off answer repeats itself (a model in a loop).

    Only decides "stop asking for more tokens"; it never changes data, so it is
    tuned to say False for anything that could be a long honest answer.
    """
    tail = content[-(_MIN_REPEATS * _MAX_PERIOD + _MIN_LOOP_CHARS) :]
    normalised = _SPACES_RE.sub(" ", tail).casefold()
    return _is_periodic(tail) or _is_periodic(normalised) or _few_items(normalised)


def _is_periodic(tail: str) -> bool:
    """Whether ``tail`` ends in one unit repeated ``_MIN_REPEATS`` times over ``_MIN_LOOP_CHARS`` or more."""
    n = len(tail)
    for p in range(1, min(_MAX_PERIOD, n // _MIN_REPEATS) + 1):
        need = max(_MIN_REPEATS * p, _MIN_LOOP_CHARS)
        if need > n:
            return False
        end = tail[n - need :]
        if end[p:] == end[:-p]:
            return True
    return False


def _few_items(normalised: str) -> bool:
    """Whether the last complete list items of ``normalised`` are at most two distinct values."""
    parts = _ITEM_SPLIT_RE.split(normalised)[:-1]  # the last part may be cut off
    items = [it for it in (p.strip(" \"'[]{}") for p in parts) if it][-_LAST_ITEMS:]
    return (
        len(items) == _LAST_ITEMS
        and min(map(len, items)) >= _MIN_ITEM_CHARS
        and len(set(items)) <= _MAX_DISTINCT_ITEMS
    )


# --- salvage -----------------------------------------------------------------

_FENCE_RE = re.compile(r"^\s*```[A-Za-z0-9_-]*[ \t]*\n?")
_STRING_STOP_RE = re.compile(r'["\\]')
# A number or literal, followed by a delimiter (or the end of the text).
_SCALAR_RE = re.compile(r"(?:-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null)(?=[\s,\]}]|$)")
_LITERALS = {"true", "false", "null"}
_CLOSER = {"{": "}", "[": "]"}


def salvage(content: str) -> Any | None:
    """The JSON object a cut-off answer was writing, up to its last complete value.

    Cuts after the last complete value, drops a dangling ``"key":`` and closes
    the open brackets. Returns the parsed dict, or None when no top-level key
    with a (possibly shortened) value is left or the text is not a JSON object.
    """
    text = _FENCE_RE.sub("", content, count=1)
    m = re.search(r"[{\[]", text)  # skip a line of prose before the JSON
    if m is None or m.group() != "{":
        return None
    text = text[m.start() :]
    cut = _last_cut(text)
    if cut is None:
        return None
    pos, closers = cut
    try:
        data = json.loads(text[:pos] + closers, strict=False)  # raw newlines in strings
    except ValueError:  # the text was not JSON before it was cut
        return None
    return data if isinstance(data, dict) and data else None


def _last_cut(text: str) -> tuple[int, str] | None:
    """Where to cut ``text`` (starting with ``{``) and what closes it after the cut.

    A small JSON scanner: it follows objects, arrays, strings and scalars, and
    remembers the position after each complete value inside the top-level
    object together with the brackets open there. It stops at the first thing
    that is not JSON, or where the top-level object closes.
    """
    # One [bracket, state] per open container. States: "open" (just opened),
    # "key"/"value" (after a comma), "colon" (after a key), "comma" (after a value).
    stack: list[list[str]] = []
    best: tuple[int, str] | None = None
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
            continue
        if not stack:
            if ch != "{" or i:
                break
            stack.append(["{", "open"])
            i += 1
            continue
        kind, state = stack[-1]
        if ch == _CLOSER[kind] and state in ("open", "comma"):
            stack.pop()
            i += 1
        elif state == "comma" and ch == ",":
            stack[-1][1] = "key" if kind == "{" else "value"
            i += 1
            continue
        elif state == "colon" and ch == ":":
            stack[-1][1] = "value"
            i += 1
            continue
        elif kind == "{" and state in ("open", "key") and ch == '"':
            end = _string_end(text, i)
            if end is None:
                break
            stack[-1][1] = "colon"
            i = end
            continue
        elif (kind == "[" and state == "open") or state == "value":
            stack[-1][1] = "comma"  # for a container: once it closes
            if ch in "{[":
                stack.append([ch, "open"])
                i += 1
                continue
            end = _string_end(text, i) if ch == '"' else _scalar_end(text, i)
            if end is None:
                break
            i = end
        else:
            break
        # A value just ended at i.
        if not stack:
            return i, ""
        best = i, "".join(_CLOSER[b] for b, _ in reversed(stack))
    return best


def _scalar_end(text: str, i: int) -> int | None:
    """Index after the number or literal at ``text[i]``; None if it is neither or may be cut off."""
    m = _SCALAR_RE.match(text, i)
    if m is None:
        return None
    if m.end() < len(text):
        return m.end()
    return m.end() if m.group() in _LITERALS else None  # "7" at the end may have been "70"


def _string_end(text: str, i: int) -> int | None:
    """Index after the closing quote of the string opening at ``text[i]``, None if cut off."""
    j = i + 1
    while True:
        m = _STRING_STOP_RE.search(text, j)
        if m is None:
            return None
        if m.group() == '"':
            return m.end()
        j = m.end() + 1  # skip the escaped character
        if j > len(text):
            return None


def dedupe_lists(value: Any) -> Any:
    """The same structure where every list keeps only the first of equal items.

    Equal as a long note's pieces are merged (``worker.extract.long_notes.same_key``: case,
    width and whitespace aside). A loop that repeated one item 50 times leaves it once.
    """
    if isinstance(value, dict):
        return {k: dedupe_lists(v) for k, v in value.items()}
    if isinstance(value, list):
        seen: set[str] = set()
        out = []
        for item in (dedupe_lists(v) for v in value):
            key = same_key(item)
            if key not in seen:
                seen.add(key)
                out.append(item)
        return out
    return value


def complete_missing(data: dict[str, Any], json_schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each missing property of the schema filled in.

    A salvaged answer lacks the keys after the cut. Missing properties become
    null when their type allows null, [] for arrays, and an object completed
    the same way for objects with ``properties``; present values are never
    changed (nested objects that are present get their missing keys filled).
    Properties of any other type stay missing for the caller's validation.
    """
    return _complete(data, json_schema, json_schema, 0)


_MAX_DEPTH = 32  # a schema that refers to itself ends here


def _complete(data: dict[str, Any], schema: dict[str, Any], root: dict[str, Any], depth: int) -> dict[str, Any]:
    out = dict(data)
    props = _resolve(schema, root).get("properties")
    if not isinstance(props, dict) or depth > _MAX_DEPTH:
        return out
    for name, raw in props.items():
        prop = _resolve(raw, root) if isinstance(raw, dict) else {}
        if name in out:
            if isinstance(out[name], dict) and isinstance(_object_branch(prop, root).get("properties"), dict):
                out[name] = _complete(out[name], _object_branch(prop, root), root, depth + 1)
            continue
        types = _types(prop, root)
        if "null" in types:
            out[name] = None
        elif "array" in types:
            out[name] = []
        elif "object" in types and isinstance(_object_branch(prop, root).get("properties"), dict):
            out[name] = _complete({}, _object_branch(prop, root), root, depth + 1)
    return out


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (``#/$defs/X``) or a single-item ``allOf``."""
    for _ in range(_MAX_DEPTH):
        ref, all_of = schema.get("$ref"), schema.get("allOf")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = root
            for part in ref[2:].split("/"):
                target = target.get(part) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                return schema
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        elif isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], dict):
            schema = {**all_of[0], **{k: v for k, v in schema.items() if k != "allOf"}}
        else:
            return schema
    return schema


def _branches(schema: dict[str, Any], root: dict[str, Any], depth: int = 0) -> list[dict[str, Any]]:
    """The schema itself or, for ``anyOf``/``oneOf``, each alternative."""
    schema = _resolve(schema, root)
    alts = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(alts, list) and depth < _MAX_DEPTH:
        return [b for alt in alts if isinstance(alt, dict) for b in _branches(alt, root, depth + 1)]
    return [schema]


def _types(schema: dict[str, Any], root: dict[str, Any]) -> set[str]:
    types: set[str] = set()
    for branch in _branches(schema, root):
        t = branch.get("type")
        types.update(t if isinstance(t, list) else [t] if isinstance(t, str) else [])
        if isinstance(branch.get("enum"), list) and None in branch["enum"]:
            types.add("null")
        if "const" in branch and branch["const"] is None:
            types.add("null")
    return types


def _object_branch(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """The alternative that describes an object with properties ({} if none)."""
    for branch in _branches(schema, root):
        if isinstance(branch.get("properties"), dict):
            return branch
    return {}
