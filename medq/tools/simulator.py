"""A stand-in for a local LLM: an OpenAI-compatible server for tests and benchmarks.

``medq llm simulate`` runs it. It answers ``POST /v1/chat/completions`` with JSON
that follows the request's JSON Schema, built from the record text without a
model, so the queue, retry and validation code can be exercised fast and
deterministically:

- ``--latency-ms`` and ``--parallel`` model a batching server: at most
  ``parallel`` requests are served at once, each for ``latency_ms``; the rest wait.
- ``--fault KIND:RATE,...`` injects the failures local servers really produce
  (see ``Outcome``); ``POST /sim/script`` forces the next outcomes in order.
- ``--reject-json-schema`` answers 400 to ``response_format: json_schema``, as
  llama-cpp-python's server does, so the client's fallback can be tested.
- ``--dialect tgi`` takes only TGI's ``{"type": "json", "value": schema}`` (or no
  response_format) and answers any other response_format with TGI's 422.
- ``--served-model NAME`` lists only those models in ``/v1/models`` and answers a
  request for any other with Ollama's 404 (``model "x" not found, try pulling it
  first``); without it every model name is taken, as llama-cpp-python's server does.
- ``--context-tokens N`` cuts a prompt longer than N tokens without an error and
  reports N prompt tokens, as Ollama does with its default context.
  ``--context-overflow refuse`` answers such a prompt instead as llama.cpp's server
  does: HTTP 400, type ``exceed_context_size_error``, with ``n_prompt_tokens`` and
  ``n_ctx`` (counted as outcome "400"). Like llama.cpp it compares the prompt alone
  with the context, not prompt + max_tokens as vLLM does. Prompt tokens are the
  simulator's own estimate (``medq.core.tokens``), not a tokenizer's count.
- ``--advertise-context`` says the limits where servers say them: ``GET /props``
  answers as llama.cpp's does (``default_generation_settings.n_ctx`` with
  ``--context-tokens``, ``total_slots`` = ``--parallel``) and each ``/v1/models``
  entry carries vLLM's ``max_model_len``. Without it ``/props`` is 404 and the models
  carry no size, as with Ollama's and llama-cpp-python's OpenAI APIs.
- Answers are streamed (server-sent events, ``stream: true``) as the real servers do:
  the answer's chunks spread over ``--latency-ms``, the usage in a last chunk when
  ``stream_options.include_usage`` asks for it. A client that closes the stream stops
  the work (its slot is free at once; ``/stats`` counts it in ``streams_closed``), as
  llama.cpp's server and vLLM do. ``--no-stream`` refuses streamed requests with a 400,
  as a server that does not stream would. ``--interrupt-streams`` ends a running stream
  (``[DONE]``, no ``finish_reason``) when another request waits for its slot, as
  llama-cpp-python's server does with ``interrupt_requests`` (its default).
- ``GET /stats`` tells what arrived and when, for load tests and benchmarks.

Where the schema comes from, in order: ``response_format.json_schema.schema``
(OpenAI), ``response_format.schema`` with type ``json_object`` (llama.cpp),
``response_format.value`` with type ``json`` (TGI), the first JSON object after a
``JSON Schema:`` line in the messages (what the processor writes into its system
prompt). With none, the answer is ``{}``.

It is a test tool, but the requests carry clinical notes all the same, so it
never logs or prints a request body.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import sys
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from medq.core.tokens import estimate_text_tokens

MODEL_ID = "medq-simulator"
# A streamed answer's chunks: about two tokens each, at most _MAX_CHUNKS of them (a real
# server sends a token a chunk, a few dozen a second; the simulator answers thousands of
# requests a second in load tests, where a chunk a token would cost both sides the CPU).
_CHARS_PER_CHUNK = 8
_MAX_CHUNKS = 4
SCHEMA_MARKER = "JSON Schema:"


class Outcome(str, Enum):
    """What one chat completion request gets. Every member but OK and REJECTED is a fault kind."""

    OK = "ok"
    RATE_LIMITED = "429"  # HTTP 429 with Retry-After: 1
    SERVER_ERROR = "500"
    UNAVAILABLE = "503"  # Ollama's "server busy" when its queue is full
    TIMEOUT = "timeout"  # no answer at all until the client gives up
    MALFORMED = "malformed"  # 200, content is not JSON
    TRUNCATED = "truncated"  # 200, content cut mid-JSON, finish_reason "length"
    INVALID = "invalid"  # 200, JSON that does not follow the schema
    INVENTED = "invented"  # 200, schema-valid JSON whose strings and numbers are not in the note
    RUNAWAY = "runaway"  # 200, a list item repeated until max_tokens, cut there, finish_reason "length"
    REJECTED = "400"  # the request itself was refused (stats only; never drawn)


# Whose request format the server takes: "openai" (every form medq sends) or "tgi".
DIALECTS = ("openai", "tgi")
# What a prompt longer than context_tokens gets: cut silently (Ollama) or refused (llama.cpp).
CONTEXT_OVERFLOWS = ("cut", "refuse")

FAULT_KINDS: tuple[str, ...] = tuple(
    o.value for o in Outcome if o not in (Outcome.OK, Outcome.REJECTED)
)
SCRIPTABLE: tuple[str, ...] = (Outcome.OK.value, *FAULT_KINDS)


# --------------------------------------------------------------------- config


def parse_faults(spec: str) -> dict[str, float]:
    """Parse ``"429:0.05,500:0.02,timeout:0.01"`` into ``{kind: probability}``.

    Raises ValueError naming the bad part: unknown kind, a rate that is not a
    number in [0, 1], a kind given twice, or rates that add up to more than 1.
    """
    rates: dict[str, float] = {}
    for part in (p.strip() for p in (spec or "").split(",")):
        if not part:
            continue
        kind, sep, rate_text = part.partition(":")
        kind = kind.strip()
        if not sep:
            raise ValueError(f"fault {part!r} must be KIND:RATE, e.g. 429:0.05")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} in {part!r}; kinds: {', '.join(FAULT_KINDS)}")
        try:
            rate = float(rate_text)
        except ValueError:
            raise ValueError(f"fault rate {rate_text.strip()!r} for {kind} is not a number") from None
        if math.isnan(rate) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate for {kind} must be between 0 and 1, got {rate_text.strip()}")
        if kind in rates:
            raise ValueError(f"fault kind {kind!r} given twice")
        rates[kind] = rate
    total = sum(rates.values())
    # A little slack so that "429:0.7,500:0.3" is not refused for float rounding.
    if total > 1.0 + 1e-9:
        raise ValueError(f"fault rates add up to {total:g}, more than 1")
    return rates


@dataclass(frozen=True)
class SimConfig:
    """How the simulator behaves; ``faults`` as returned by ``parse_faults``."""

    latency_ms: float = 0.0
    parallel: int = 64
    faults: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    reject_json_schema: bool = False
    dialect: str = "openai"
    served_models: tuple[str, ...] = ()  # empty: any model name is taken
    context_tokens: int | None = None  # longer prompts are cut to this, silently, or refused
    context_overflow: str = "cut"  # "cut" (Ollama) or "refuse" (llama.cpp's 400)
    advertise_context: bool = False  # GET /props and max_model_len say the limits
    stream: bool = True  # streamed answers (False: a stream request gets a 400)
    interrupt_streams: bool = False  # a waiting request cuts a running stream (llama-cpp-python)
    # Long enough that any sane client timeout fires first.
    timeout_hold_s: float = 300.0

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {self.parallel}")
        if not self.latency_ms >= 0:
            raise ValueError(f"latency_ms must be 0 or more, got {self.latency_ms}")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise ValueError(f"context_tokens must be at least 1, got {self.context_tokens}")
        if self.context_overflow not in CONTEXT_OVERFLOWS:
            raise ValueError(
                f"context_overflow must be one of {', '.join(CONTEXT_OVERFLOWS)}, got {self.context_overflow!r}"
            )
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, got {self.dialect!r}")
        # Re-check so that a SimConfig built in Python is as safe as one from the CLI.
        parse_faults(",".join(f"{k}:{v}" for k, v in self.faults.items()))


# ---------------------------------------------------------------------- stats


class Stats:
    """What arrived and how it was answered; chat completions only, faults included."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting = 0  # arrived, waiting for one of the --parallel slots
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.arrivals: list[float] = []
        self.outcomes: Counter[str] = Counter()
        self.max_tokens: list[int | None] = []
        # response_format "type" per request ("none" without one), refused ones included.
        self.response_formats: Counter[str] = Counter()
        self.streams = 0  # requests answered as a stream
        self.streams_closed = 0  # of those, closed by the client before their end: work stopped
        self.streams_cut = 0  # of those, ended early for a request waiting (--interrupt-streams)
        # in_flight is a live gauge: zeroing it under running requests would drive it negative.
        self.max_in_flight = self.in_flight
        self.max_waiting = self.waiting

    def arrive(self, arrived_at_s: float, max_tokens: int | None) -> None:
        self.requests += 1
        self.arrivals.append(arrived_at_s)
        self.max_tokens.append(max_tokens)

    def queue(self) -> None:
        """A request that found every slot taken."""
        self.waiting += 1
        self.max_waiting = max(self.max_waiting, self.waiting)

    def enter(self, queued: bool) -> None:
        self.waiting -= queued
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "arrivals": list(self.arrivals),
            "max_in_flight": self.max_in_flight,
            "in_flight": self.in_flight,
            "max_waiting": self.max_waiting,  # the longest queue behind the slots
            "outcomes": dict(self.outcomes),
            "max_tokens": list(self.max_tokens),
            "response_formats": dict(self.response_formats),
            "streams": self.streams,
            "streams_closed": self.streams_closed,
            "streams_cut": self.streams_cut,
        }


# ----------------------------------------------------------- faults drawing


def draw_outcome(rng: random.Random, faults: dict[str, float]) -> Outcome:
    """One draw: each fault kind with its probability, OK with what is left."""
    u = rng.random()
    cumulative = 0.0
    for kind, rate in faults.items():
        cumulative += rate
        if u < cumulative:
            return Outcome(kind)
    return Outcome.OK


def malformed_content(valid: str) -> str:
    # Half an answer then chat-template debris: what a model that lost the
    # grammar produces. Anything after "<" makes it unparsable whatever the half.
    return valid[: max(1, len(valid) // 2)] + "<|im_end|> Sure! Here is the JSON"


def runaway_content(instance: Any, max_tokens: int | None) -> str:
    """A small model in a loop: the answer's first list repeats its first item (or a
    made-up one) until about ``max_tokens`` tokens, and is cut there, mid-item."""
    doc = dict(instance) if isinstance(instance, dict) else {}
    key = next((k for k, v in doc.items() if isinstance(v, list)), None) or "items"
    items = doc.pop(key, None) or ["the same again"]
    rest = json.dumps(doc, ensure_ascii=False)[1:-1]  # the other fields, complete, first
    head = "{" + (rest + ", " if rest else "") + json.dumps(key) + ": ["
    item = json.dumps(items[0], ensure_ascii=False) + ", "
    budget = (max_tokens or 1024) * 4  # characters, about
    return (head + item * (budget // len(item) + 2))[:budget]


def truncated_content(valid: str) -> str:
    # A proper prefix of a JSON object text is never valid JSON (the last "}" is missing).
    return valid[: max(1, len(valid) * 2 // 3)]


def invalid_instance(schema: dict[str, Any]) -> Any:
    """Valid JSON that breaks ``schema``: every property gets a type it does not allow,
    plus a key the schema does not know."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    out: dict[str, Any] = {"unexpected": True}
    if isinstance(props, dict):
        for name, prop in props.items():
            out[name] = _wrong_value(prop)
    return out


def _wrong_value(prop: Any) -> Any:
    allowed = set(_types(prop)) if isinstance(prop, dict) else set()
    if "string" not in allowed:
        return "not-a-valid-value"
    if not allowed & {"integer", "number"}:
        return 12345
    return [{"unexpected": True}] if "array" not in allowed else {"unexpected": True}


# ------------------------------------------------------- the schema instance


_WORD_RE = re.compile(r"\w+(?:[-'/.]\w+)*")
# "72-year-old", "72 years", "72 yo", "72 y/o", "72岁"
_AGE_AFTER_RE = re.compile(r"(\d{1,3})\s*-?\s*(?:years?\b|yrs?\b|yo\b|y/o|y\.o\.|岁|歳)", re.IGNORECASE)
# "Age: 72", "aged 72"
_AGE_BEFORE_RE = re.compile(r"\bage[d]?\s*[:=]?\s*(\d{1,3})\b", re.IGNORECASE)


# What an "invented" answer is made from: words and an age that no test note contains,
# as a model that hallucinates would answer.
INVENTED_TEXT = "Qzxv hallucinated Wyvernol, 131-year-old"


def generate(schema: dict[str, Any], text: str) -> Any:
    """An instance valid against ``schema``, built from ``text`` where it can be.

    Pure and deterministic: the same schema and text give the same answer. Strings
    are phrases cut from the text (picked by a stable hash of field and text),
    enums take the first value the text mentions, an integer field named like
    ``age`` takes the age written in the text, other numbers are null or 0,
    arrays get one item when there is text, objects get every property.
    """
    return _generate(schema, text, "")


def _types(node: dict[str, Any]) -> list[str]:
    t = node.get("type")
    if isinstance(t, list):
        return [str(x) for x in t]
    if isinstance(t, str):
        return [t]
    if "properties" in node:
        return ["object"]
    if "items" in node:
        return ["array"]
    return []


def _generate(node: Any, text: str, path: str) -> Any:
    if not isinstance(node, dict):
        return None  # `true` or an unknown shape: anything goes
    if "const" in node:
        return node["const"]
    for key in ("anyOf", "oneOf"):
        branches = node.get(key)
        if isinstance(branches, list) and branches:
            # Pydantic writes Optional[X] as anyOf [X, null]: prefer the real branch.
            real = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            return _generate(real[0] if real else branches[0], text, path)

    types = _types(node)
    nullable = "null" in types
    if "enum" in node:
        return _pick_enum(node["enum"], types, text)
    kinds = [t for t in types if t != "null"]
    if not kinds:
        return None
    kind = kinds[0]
    if kind == "object":
        props = node.get("properties") or {}
        return {name: _generate(prop, text, f"{path}.{name}" if path else name) for name, prop in props.items()}
    if kind == "array":
        min_items = int(node.get("minItems", 0))
        count = max(min_items, 1 if text.strip() else 0)
        if "maxItems" in node:
            count = min(count, int(node["maxItems"]))
        return [_generate(node.get("items", {}), text, f"{path}[{i}]") for i in range(count)]
    if kind == "string":
        phrase = _phrase(path, text)
        if phrase is None:
            return None if nullable else ""
        if "maxLength" in node:
            phrase = phrase[: int(node["maxLength"])]
        return phrase
    if kind in ("integer", "number"):
        if _is_age_field(path):
            age = _find_age(text)
            if age is not None:
                return age
        if nullable:
            return None
        minimum = node.get("minimum", 0)
        return max(0, math.ceil(minimum)) if isinstance(minimum, (int, float)) else 0
    if kind == "boolean":
        # True when the text names the field ("smoker" in "current smoker"), else False.
        words = _field_words(path)
        lowered = text.lower()
        return bool(words) and all(w in lowered for w in words)
    return None


def _pick_enum(values: list[Any], types: list[str], text: str) -> Any:
    lowered = text.lower()
    for value in values:
        if value is None:
            continue
        needle = str(value).lower()
        for form in {needle, needle.replace("_", " ")}:
            if re.search(rf"(?<!\w){re.escape(form)}(?!\w)", lowered):
                return value
    # null is only allowed when the enum lists it and the type (if given) admits it
    if None in values and (not types or "null" in types):
        return None
    non_null = [v for v in values if v is not None]
    return non_null[0] if non_null else None


def _stable_hash(*parts: str) -> int:
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def _phrase(path: str, text: str) -> str | None:
    words = list(_WORD_RE.finditer(text))
    if not words:
        return None
    h = _stable_hash(path, text)
    start = (h >> 8) % len(words)
    end = min(len(words), start + 1 + h % 3) - 1
    # A span of the original text, so the value is something the note says.
    return " ".join(text[words[start].start() : words[end].end()].split())


def _field_words(path: str) -> list[str]:
    name = re.sub(r"\[\d+\]", "", path).rsplit(".", 1)[-1]
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return [w for w in re.split(r"[^a-z]+", name.lower()) if w]


def _is_age_field(path: str) -> bool:
    return "age" in _field_words(path)


def _find_age(text: str) -> int | None:
    found = [m for m in (_AGE_AFTER_RE.search(text), _AGE_BEFORE_RE.search(text)) if m]
    if not found:
        return None
    return int(min(found, key=lambda m: m.start()).group(1))


# ------------------------------------------------------------ request parsing


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


# The start of medq's re-ask turn (worker.extract.processor.REASK_PROMPT; a test keeps them equal).
REASK_PREFIX = "That answer does not follow"


def record_text(messages: list[Any]) -> str:
    """The record: the last user message that is not a re-ask. Earlier user turns are
    few-shot examples, later ones complain about the model's answer."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            text = _content_text(message.get("content"))
            if not text.startswith(REASK_PREFIX):
                return text
    return ""


def schema_from_messages(messages: list[Any]) -> dict[str, Any] | None:
    """The first JSON object after a ``JSON Schema:`` line that parses, if any."""
    decoder = json.JSONDecoder()
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = _content_text(message.get("content"))
        at = content.find(SCHEMA_MARKER)
        while at != -1:
            brace = content.find("{", at)
            while brace != -1:
                try:
                    found, _ = decoder.raw_decode(content, brace)
                except json.JSONDecodeError:
                    found = None
                if isinstance(found, dict):
                    return found
                brace = content.find("{", brace + 1)
            at = content.find(SCHEMA_MARKER, at + len(SCHEMA_MARKER))
    return None


def request_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema the answer must follow, from response_format or the messages."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
                return spec["schema"]
        if isinstance(fmt.get("schema"), dict):  # llama.cpp: {"type": "json_object", "schema": {...}}
            return fmt["schema"]
        if fmt.get("type") in _TGI_JSON_TYPES and isinstance(fmt.get("value"), dict):  # TGI
            return fmt["value"]
    messages = body.get("messages")
    return schema_from_messages(messages) if isinstance(messages, list) else None


def _estimate_tokens(text: str) -> int:
    return max(1, estimate_text_tokens(text))


# TGI's JSON grammar type and the alias it also takes; the content is always in "value".
_TGI_JSON_TYPES = ("json", "json_object")


def tgi_refusal(fmt: Any) -> str | None:
    """What TGI (axum + serde) answers, as plain text with HTTP 422, to a response_format
    it cannot read; None for one it takes."""
    prefix = "Failed to deserialize the JSON body into the target type: response_format: "
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in _TGI_JSON_TYPES:
        return None if isinstance(fmt.get("value"), dict) else prefix + "missing field `value`"
    if kind == "regex":  # TGI takes it, but the simulator cannot answer to a regex
        return "response_format regex: not simulated"
    shown = kind if isinstance(kind, str) else "<not a string>"
    return prefix + f"unknown variant `{shown}`, expected `json` or `regex`"


LLAMA_CPP_JSON_SCHEMA_REFUSAL = (
    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
    "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
    "'ctx': {'expected': \"'text' or 'json_object'\"}}"
)


def _prompt_tokens(messages: list[Any]) -> int:
    """The simulator's count of a request's prompt tokens: every message's text, estimated."""
    return _estimate_tokens("".join(_content_text(m.get("content")) for m in messages if isinstance(m, dict)))


LLAMA_CPP_CONTEXT_REFUSAL = "the request exceeds the available context size, try increasing it"


def context_refusal(prompt_tokens: int, context_tokens: int) -> JSONResponse:
    """llama.cpp's server's answer to a prompt longer than its context (``n_ctx`` is per
    slot there): a 400 whose error object carries both counts."""
    error = {
        "code": 400,
        "message": LLAMA_CPP_CONTEXT_REFUSAL,
        "type": "exceed_context_size_error",
        "n_prompt_tokens": prompt_tokens,
        "n_ctx": context_tokens,
    }
    return JSONResponse({"error": error}, status_code=400)


def props(config: SimConfig) -> dict[str, Any]:
    """What llama.cpp's ``GET /props`` says of the limits: the context of one slot
    (only when ``context_tokens`` is set) and how many slots serve at once."""
    settings: dict[str, Any] = {"id": 0, "id_task": -1, "is_processing": False}
    if config.context_tokens is not None:
        settings["n_ctx"] = config.context_tokens
    return {"default_generation_settings": settings, "total_slots": config.parallel, "model_path": MODEL_ID}


def _error(status: int, message: str, type_: str, code: str | None = None, **headers: str) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers or None)


# ----------------------------------------------------------------------- app


class _Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.rng = random.Random(config.seed)
        self.script: deque[Outcome] = deque()
        self.slots = asyncio.Semaphore(config.parallel)

    def reset(self) -> None:
        self.stats.reset()
        self.script.clear()
        # Reseeded too, so a run after reset draws the same faults as a fresh server.
        self.rng = random.Random(self.config.seed)

    def next_outcome(self) -> Outcome:
        if self.script:
            return self.script.popleft()
        return draw_outcome(self.rng, self.config.faults)

    async def chat_completions(self, request: Request) -> Response:
        arrived_at_s = time.time()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        max_tokens = None
        if isinstance(body, dict):
            raw = body.get("max_tokens", body.get("max_completion_tokens"))
            max_tokens = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
        self.stats.arrive(arrived_at_s, max_tokens)
        if isinstance(body, dict):
            fmt = body.get("response_format")
            self.stats.response_formats[str(fmt.get("type")) if isinstance(fmt, dict) else "none"] += 1

        refusal = self._refusal(body)
        if refusal is not None:
            self.stats.outcomes[Outcome.REJECTED.value] += 1
            return refusal
        assert isinstance(body, dict)  # _refusal checked it

        outcome = self.next_outcome()
        self.stats.outcomes[outcome.value] += 1
        if outcome is Outcome.TIMEOUT:
            # Outside the semaphore: a hung request should not also starve the others.
            return await self._hold(request)

        if body.get("stream"):
            return await self._streamed(body, outcome, max_tokens)
        queued = self.slots.locked()
        if queued:
            self.stats.queue()
        async with self.slots:
            self.stats.enter(queued)
            try:
                if self.config.latency_ms > 0:
                    await asyncio.sleep(self.config.latency_ms / 1000)
                return self._answer(body, outcome, max_tokens)
            finally:
                self.stats.leave()

    def _refusal(self, body: Any) -> Response | None:
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "invalid_request_error")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "messages must be a non-empty list", "invalid_request_error")
        if body.get("stream") and not self.config.stream:
            return _error(400, "stream is not supported by this server", "invalid_request_error")
        model = body.get("model")
        if self.config.served_models and model not in self.config.served_models:
            # Ollama's answer, word for word, to a model it has not pulled.
            return _error(404, f'model "{model}" not found, try pulling it first', "not_found_error")
        fmt = body.get("response_format")
        if self.config.dialect == "tgi" and fmt is not None:
            refused = tgi_refusal(fmt)
            if refused is not None:
                return PlainTextResponse(refused, status_code=422)
        if self.config.reject_json_schema and isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            # What llama-cpp-python's server (0.3.x) answers: a 500 carrying pydantic's
            # validation error, not a 400, so clients must read the message, not the status.
            return _error(500, LLAMA_CPP_JSON_SCHEMA_REFUSAL, "internal_server_error")
        context = self.config.context_tokens
        if self.config.context_overflow == "refuse" and context is not None:
            prompt_tokens = _prompt_tokens(body["messages"])
            if prompt_tokens > context:
                return context_refusal(prompt_tokens, context)
        return None

    async def _hold(self, request: Request) -> Response:
        # Starlette does not cancel a handler when its client goes away, so look.
        deadline = time.monotonic() + self.config.timeout_hold_s
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                break
            await asyncio.sleep(0.2)
        return _error(504, "simulated timeout", "timeout")

    async def _streamed(self, body: dict[str, Any], outcome: Outcome, max_tokens: int | None) -> Response:
        """The answer as server-sent events, made while it is sent: the slot is held until
        the last chunk, or until the client closes the stream (then the work stops)."""
        queued = self.slots.locked()
        if queued:
            self.stats.queue()
        await self.slots.acquire()
        self.stats.enter(queued)
        answer = self._answer(body, outcome, max_tokens)
        if answer.status_code != 200:  # faults are answered whole, as servers do before streaming
            self.stats.leave()
            self.slots.release()
            return answer
        doc = json.loads(bytes(answer.body))
        self.stats.streams += 1
        return StreamingResponse(self._chunks(doc, body), media_type="text/event-stream")

    async def _chunks(self, doc: dict[str, Any], body: dict[str, Any]) -> Any:
        choice = doc["choices"][0]
        content = choice["message"]["content"]
        chunks = _MAX_CHUNKS if self.config.latency_ms > 0 else 1  # no time to spread it over: one
        size = max(_CHARS_PER_CHUNK, -(-len(content) // chunks))
        pieces = [content[i:i + size] for i in range(0, len(content), size)] or [""]
        gap_s = self.config.latency_ms / 1000 / (len(pieces) + 1)
        head = {"id": doc["id"], "object": "chat.completion.chunk", "created": doc["created"], "model": doc["model"]}
        finished = False
        try:
            for i, piece in enumerate(pieces):
                if gap_s > 0:
                    await asyncio.sleep(gap_s)
                if self.config.interrupt_streams and self.stats.waiting > 0:
                    self.stats.streams_cut += 1  # what llama-cpp-python sends: the end, no finish_reason
                    yield "data: [DONE]\n\n"
                    finished = True
                    return
                last = i == len(pieces) - 1
                delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                event = {**head, "choices": [{"index": 0, "delta": delta,
                                             "finish_reason": choice["finish_reason"] if last else None}]}
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            options = body.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': doc['usage']})}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.stats.streams_closed += 1
            self.stats.leave()
            self.slots.release()

    def _answer(self, body: dict[str, Any], outcome: Outcome, max_tokens: int | None) -> Response:
        if outcome is Outcome.RATE_LIMITED:
            return _error(
                429,
                "Rate limit reached, please retry after 1 s",
                "rate_limit_error",
                "rate_limit_exceeded",
                **{"Retry-After": "1"},
            )
        if outcome is Outcome.SERVER_ERROR:
            return _error(500, "simulated internal server error", "server_error")
        if outcome is Outcome.UNAVAILABLE:
            return _error(503, "server busy, please try again. maximum pending requests exceeded", "server_error")

        messages = body["messages"]
        schema = request_schema(body)
        text = record_text(messages)
        prompt_tokens = _prompt_tokens(messages)
        if self.config.context_tokens is not None and prompt_tokens > self.config.context_tokens:
            text = _cut_to_context(text, prompt_tokens, self.config.context_tokens)
            prompt_tokens = self.config.context_tokens
        instance = generate(schema, text) if schema is not None else {}
        content = json.dumps(instance, ensure_ascii=False)
        finish_reason = "stop"
        if outcome is Outcome.MALFORMED:
            content = malformed_content(content)
        elif outcome is Outcome.TRUNCATED:
            content = truncated_content(content)
            finish_reason = "length"
        elif outcome is Outcome.INVALID:
            content = json.dumps(invalid_instance(schema or {}), ensure_ascii=False)
        elif outcome is Outcome.INVENTED:
            content = json.dumps(generate(schema, INVENTED_TEXT) if schema is not None else {}, ensure_ascii=False)
        elif outcome is Outcome.RUNAWAY:
            content = runaway_content(instance, max_tokens)
            finish_reason = "length"

        completion_tokens = _estimate_tokens(content)
        if outcome in (Outcome.TRUNCATED, Outcome.RUNAWAY) and max_tokens:
            completion_tokens = max_tokens  # a real server stops because it reached max_tokens
        return JSONResponse(
            {
                "id": f"chatcmpl-sim-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or MODEL_ID,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    async def script_outcomes(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        outcomes = body.get("outcomes") if isinstance(body, dict) else None
        if not isinstance(outcomes, list) or not all(isinstance(o, str) for o in outcomes):
            return _error(400, 'body must be {"outcomes": ["ok", "429", ...]}', "invalid_request_error")
        unknown = [o for o in outcomes if o not in SCRIPTABLE]
        if unknown:
            return _error(
                400, f"unknown outcomes {unknown}; use {', '.join(SCRIPTABLE)}", "invalid_request_error"
            )
        self.script.extend(Outcome(o) for o in outcomes)
        return JSONResponse({"queued": len(self.script)})


def _cut_to_context(note: str, prompt_tokens: int, context_tokens: int) -> str:
    """What is left of the note when the prompt is cut to ``context_tokens``: the rest of
    the prompt (instructions, schema) is kept, the note loses what does not fit."""
    note_tokens = _estimate_tokens(note)
    keep_tokens = max(0, context_tokens - (prompt_tokens - note_tokens))
    return note[: len(note) * min(keep_tokens, note_tokens) // note_tokens]


def create_app(config: SimConfig) -> FastAPI:
    """The simulator as an ASGI app; each app has its own stats, script and random stream."""
    sim = _Simulator(config)
    app = FastAPI(title="medq LLM simulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.simulator = sim

    # vLLM's field for the context; only when asked to say it (Ollama's list does not).
    size = (
        {"max_model_len": config.context_tokens}
        if config.advertise_context and config.context_tokens is not None
        else {}
    )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = config.served_models or (MODEL_ID,)
        data = [{"id": name, "object": "model", "owned_by": "medq", **size} for name in names]
        return {"object": "list", "data": data}

    if config.advertise_context:  # else 404, as servers other than llama.cpp's answer

        @app.get("/props")
        async def get_props() -> dict[str, Any]:
            return props(config)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await sim.chat_completions(request)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return sim.stats.snapshot()

    @app.post("/sim/script")
    async def script(request: Request) -> Response:
        return await sim.script_outcomes(request)

    @app.post("/sim/reset")
    async def reset() -> dict[str, Any]:
        sim.reset()
        return {"reset": True}

    return app


def make_config(
    latency_ms: float = 0.0,
    parallel: int = 64,
    fault: str = "",
    seed: int | None = None,
    reject_json_schema: bool = False,
    dialect: str = "openai",
    served_model: list[str] | None = None,
    context_tokens: int | None = None,
    context_overflow: str = "cut",
    advertise_context: bool = False,
    stream: bool = True,
    interrupt_streams: bool = False,
) -> SimConfig:
    """The configuration ``medq llm simulate``'s options describe (named as its parameters:
    ``fault`` as ``KIND:RATE,...``, ``served_model`` repeated or comma-separated). Bad
    options raise ``typer.BadParameter``, before any server starts."""
    import typer

    try:
        fault_rates = parse_faults(fault)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--fault'") from None
    try:
        return SimConfig(
            latency_ms=latency_ms,
            parallel=parallel,
            faults=fault_rates,
            seed=seed,
            reject_json_schema=reject_json_schema,
            dialect=dialect,
            served_models=tuple(name.strip() for names in served_model or [] for name in names.split(",") if name.strip()),
            context_tokens=context_tokens,
            context_overflow=context_overflow,
            advertise_context=advertise_context,
            stream=stream,
            interrupt_streams=interrupt_streams,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8090) -> None:
    """Run the simulator with uvicorn until interrupted."""
    import uvicorn

    described = ", ".join(f"{k}:{v:g}" for k, v in config.faults.items()) or "none"
    print(
        f"medq simulator on http://{host}:{port}/v1 (latency {config.latency_ms:g} ms, "
        f"parallel {config.parallel}, faults {described})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        workers=1,
        loop="asyncio",
        log_level="warning",
        access_log=False,
        # A request held by the timeout fault must not keep a stopping server alive.
        timeout_graceful_shutdown=2,
    )
