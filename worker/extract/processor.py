"""``MedicalDataProcessor``: one note + one schema -> validated data + provenance.

The loop, per call to the model:

1. ask for schema-constrained JSON in the form the endpoint accepts; a refused
   ``response_format`` steps down to the next form (remembered by the endpoint's state
   in Redis, so every worker asks it once per endpoint, not once per job or process);
2. ``finish_reason == "length"`` is truncation, not bad JSON: ask again with a
   doubled ``max_tokens``, up to ``max_tokens_cap``;
3. validate with pydantic; on errors, show the model its errors (field paths and
   messages, never values) and ask again, ``reasks`` times at most.

A note longer than the endpoint's context (``context_tokens``: the setting, or what
the worker learned from the server at start) is split into pieces that fit with the
prompt and the answer; each piece is extracted and the answers are merged
(``worker.extract.long_notes``: the rules). A server that refuses a prompt as too long
(``ContextExceeded``) or cuts it silently (an answer whose ``usage.prompt_tokens`` is
below a safe lower bound of the prompt's size: ``PromptTruncated``, Ollama) has told
its context size: the processor keeps it and extracts the note again, in pieces.

An answer cut at ``max_tokens`` that repeats itself (a model in a loop,
``worker.extract.runaway``) is not asked again with more tokens: what was complete of it is
kept, its lists without repeats. Each call's timeout follows the endpoint's measured
speed (``worker.llm.speed``): at least ``timeout_s``, longer for a slow server.

Strategies: ``single`` asks for the whole schema in one call; ``fields`` asks one
question per top-level field, each with a small schema, and merges the answers.
Which is better depends on the model: measure with ``medq demo`` / ``medq eval``
(README, "Extraction quality": on SmolLM2-135M, single scored higher and took less
time). The schema's ``examples`` are shown as few-shot turns. Then every value is
located in the note (``worker.extract.evidence``): the spans are the result's ``evidence``,
and values without any are flagged (or dropped).

Endpoint errors (connection, timeout, 429, 5xx) propagate as ``RetryableError``:
retrying a whole job is the task's business, with backoff, not this loop's.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from medq.core.errors import (
    ContextExceeded,
    EndpointMisconfigured,
    InvalidRecord,
    OutputInvalid,
    OutputTruncated,
    PromptTruncated,
)
from medq.core.schemas import ExtractionSchema, SchemaLoader, build_schema
from medq.core.settings import EndpointSettings
from medq.core.tokens import estimate_text_tokens
from medq.core.urls import redact_url
from medq.state.endpoints import EndpointGate
from worker.extract.evidence import Evidence, drop_unsupported, locate, unsupported_paths
from worker.extract.long_notes import merge_answers, split_note
from worker.extract.runaway import complete_missing, dedupe_lists, is_runaway, salvage
from worker.llm.client import (
    RESPONSE_FORMATS,
    AsyncLLMClient,
    Completion,
    FormatRejected,
    LLMClient,
    Usage,
    response_format_for,
)
from worker.llm.speed import SpeedModel

Strategy = Literal["single", "fields"]
Grounding = Literal["flag", "drop"]

SINGLE_SYSTEM = """You extract structured data from clinical notes.
{description}{instructions}Fields:
{field_lines}
Reply with one JSON object and nothing else, with every field present.
Copy values exactly as written in the note. Use null, or [] for a list, when the note does not say. Never invent values."""

# The schema itself, after the field list: the model sees the exact shape even where the
# server does not enforce it. A shorter prompt without it (schema_in_prompt=False) relies
# on the field list and on the response_format the server enforces.
SINGLE_SCHEMA = """
JSON Schema:
{schema}"""

# In the fields strategy every call of a record shares the system turn and the note,
# and only the question at the end differs: llama.cpp (and vLLM's prefix cache) then
# evaluate the note once per record, not once per field. Keep the note before anything
# that varies.
FIELD_SYSTEM = """You answer questions about a clinical note with JSON.
Copy values exactly as written in the note. Answer null, or [] for a list, when the note does not say. Never invent values."""

FIELD_EXAMPLE = """

Example note:
{text}
The facts in it:
{data}"""

FIELD_QUESTION = """Note:
{text}

Question: {question}
Answer with JSON only, like {shape}
JSON Schema:
{schema}"""

REASK_PROMPT = """That answer does not follow the JSON Schema:
{errors}
Reply with the corrected JSON object only."""


@dataclass
class Provenance:
    model: str
    endpoint: str
    response_format: str
    strategy: str = "single"
    llm_calls: int = 0
    reasks: int = 0
    truncations: int = 0
    finish_reason: str | None = None
    latency_ms: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)
    ungrounded_fields: list[str] = field(default_factory=list)  # values without evidence in the note
    dropped_fields: list[str] = field(default_factory=list)
    pieces: int = 1  # a note longer than the context is extracted in pieces, then merged
    context_tokens: int | None = None  # the endpoint's context the pieces were cut for
    runaway_answers: int = 0  # answers cut at max_tokens while repeating themselves: kept in part

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latency_ms": round(self.latency_ms, 1)}


@dataclass
class Extraction:
    """``data`` (validated), ``evidence`` (path -> ``[[start, end], ...]`` offsets into the
    note, for each value found in it: see ``worker.extract.evidence``) and ``provenance``."""

    data: BaseModel
    schema: ExtractionSchema
    provenance: Provenance
    evidence: Evidence = field(default_factory=dict)

    def data_dict(self) -> dict[str, Any]:
        return self.data.model_dump(mode="json")


@dataclass(frozen=True)
class _Part:
    """What one call asks for: a schema (whole or one field) and its fixed messages."""

    schema: ExtractionSchema
    system: str
    question: str | None  # None: the note itself is the user turn (strategy single)
    shots: tuple[dict[str, str], ...]
    schema_json: str = ""


# One model call as the extraction asks for it: messages, schema, max_tokens, provenance,
# and how many leading messages are the same for every record (system and few-shot turns).
_Call = tuple[list[dict[str, str]], ExtractionSchema, int, Provenance, int]


class MedicalDataProcessor:
    """Extracts validated structured data from clinical text with an OpenAI-compatible LLM.

    ``MedicalDataProcessor(model, api_key, base_url=None, schema_loader=None)``; the
    remaining knobs default from settings. Safe to share between threads.
    """

    def __init__(
        self,
        model: str,
        api_key: str,
        base_url: str | None = None,
        schema_loader: SchemaLoader | None = None,
        *,
        response_format: str = "auto",
        timeout_s: float = 120.0,
        timeout_max_s: float = 900.0,
        context_tokens: int | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        max_tokens_cap: int = 4096,
        reasks: int = 2,
        strategy: Strategy = "single",
        few_shot: bool = True,
        schema_in_prompt: bool = True,
        grounding: Grounding = "flag",
        gate: EndpointGate | None = None,
    ) -> None:
        url = base_url or "https://api.openai.com/v1"
        self.base_url = redact_url(url)  # as shown and stored (results, provenance): no userinfo
        self.schema_loader = schema_loader or SchemaLoader()
        self.client = LLMClient(url, api_key, model, timeout_s, gate=gate)
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_tokens_cap = max(max_tokens_cap, max_tokens)
        self.reasks = reasks
        if strategy not in ("single", "fields"):
            raise ValueError("strategy must be single or fields")
        if grounding not in ("flag", "drop"):
            raise ValueError("grounding must be flag or drop")
        self.strategy = strategy
        self.few_shot = few_shot
        self.schema_in_prompt = schema_in_prompt
        self.grounding = grounding
        if response_format != "auto" and response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be auto or one of {RESPONSE_FORMATS}")
        self._auto_format = response_format == "auto"
        self._format = RESPONSE_FORMATS[0] if self._auto_format else response_format
        self._lock = threading.Lock()
        # The endpoint's context window: the setting, else learned (worker start, or a refusal).
        self.context_tokens = context_tokens
        self._token_ratio = _TOKEN_RATIO_START  # the server's token count / medq's estimate
        self.speed = SpeedModel(timeout_s, max(timeout_max_s, timeout_s))
        self._parts: dict[tuple[str, int, bool], list[_Part]] = {}
        self._fixed_tokens: dict[tuple[str, int, bool], int] = {}  # the longest prompt without the note, estimated
        self._formats: dict[tuple[str, str, int], dict[str, Any] | None] = {}
        # The engine's client: same endpoint and gate, made now, connected on first use.
        self.aclient = AsyncLLMClient(url, api_key, model, timeout_s, gate=gate)

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        schema_loader: SchemaLoader | None = None,
        *,
        endpoint: EndpointSettings | None = None,
        gate: EndpointGate | None = None,
    ) -> MedicalDataProcessor:
        """A processor for ``endpoint`` (default: ``MEDQ_LLM__BASE_URL``) with the ``llm`` settings."""
        llm = settings.llm
        ep = endpoint or EndpointSettings(url=llm.base_url)
        return cls(
            ep.model or llm.model,
            (ep.api_key or llm.api_key).get_secret_value(),
            ep.url,
            schema_loader or SchemaLoader(settings.schema_dirs),
            response_format=llm.response_format,
            timeout_s=llm.timeout_s,
            timeout_max_s=llm.timeout_max_s,
            context_tokens=ep.context_tokens or llm.context_tokens,
            temperature=llm.temperature,
            max_tokens=llm.max_tokens,
            max_tokens_cap=llm.max_tokens_cap,
            reasks=llm.reasks,
            strategy=llm.strategy,
            few_shot=llm.few_shot,
            schema_in_prompt=llm.schema_in_prompt,
            grounding=llm.grounding,
            gate=gate,
        )

    @property
    def response_format(self) -> str:
        return self._format

    def process(self, text: str, schema: str | ExtractionSchema, record_id: str = "?") -> Extraction:
        """Extract ``schema`` from ``text``. Raises ``RetryableError`` or ``PermanentError``."""
        steps = self._extraction(text, schema, record_id)
        try:
            call = next(steps)
            while True:
                call = steps.send(self._call(*call))
        except StopIteration as done:
            result: Extraction = done.value
            return result

    async def aprocess(self, text: str, schema: str | ExtractionSchema, record_id: str = "?") -> Extraction:
        """:meth:`process` on the running asyncio loop (the worker engine's way)."""
        steps = self._extraction(text, schema, record_id)
        try:
            call = next(steps)
            while True:
                call = steps.send(await self._acall(*call))
        except StopIteration as done:
            result: Extraction = done.value
            return result

    # The extraction is written once, as a generator that yields each model call it
    # needs and is sent the completion (or the server's refusal of a prompt longer than
    # its context); process() and aprocess() only differ in how they make the call.
    def _extraction(
        self, text: str, schema: str | ExtractionSchema, record_id: str
    ) -> Generator[_Call, Completion | ContextExceeded, Extraction]:
        """:meth:`_steps`, again in smaller pieces when the server refused or cut the prompt."""
        for tries_left in range(_CONTEXT_LEARNING_TRIES, -1, -1):
            try:
                return (yield from self._steps(text, schema, record_id))
            except (ContextExceeded, PromptTruncated) as exc:
                if not tries_left or not self._learn_context(exc):
                    raise
        raise AssertionError("unreachable")

    def _learn_context(self, exc: ContextExceeded | PromptTruncated) -> bool:
        """What a refused or cut prompt says of the endpoint's context; True when the note
        can be tried again in smaller pieces. The server's own number wins (llama.cpp's
        ``n_ctx``, what Ollama read); a refusal without one: three quarters of what was
        assumed. A server that refuses at the size medq assumed counts tokens more
        thickly than medq's estimate: the estimate is scaled up instead."""
        said = exc.context_tokens if isinstance(exc, ContextExceeded) else exc.read_tokens
        with self._lock:
            current = self.context_tokens
            if said > 0 and (current is None or said < current):
                self.context_tokens = said
            elif current is not None and said <= 0:
                self.context_tokens = current * 3 // 4
            elif said <= 0:
                self.context_tokens = _CONTEXT_GUESS
            elif self._token_ratio < _TOKEN_RATIO_MAX:
                self._token_ratio = min(self._token_ratio * 1.5, _TOKEN_RATIO_MAX)
            else:
                return False
            return True

    def _steps(
        self, text: str, schema: str | ExtractionSchema, record_id: str
    ) -> Generator[_Call, Completion | ContextExceeded, Extraction]:
        sch = schema if isinstance(schema, ExtractionSchema) else self.schema_loader.get(schema)
        if not text or not text.strip():
            raise InvalidRecord(f"record {record_id}: text is empty")
        started = time.perf_counter()
        usage = Usage()
        prov = Provenance(model=self.model, endpoint=self.base_url, response_format=self._format, strategy=self.strategy)
        parts, spans = self._pieces(text, sch, record_id)
        prov.pieces, prov.context_tokens = len(spans), self.context_tokens
        pieces: list[dict[str, Any]] = []
        for n, (start, end) in enumerate(spans, 1):
            who = record_id if len(spans) == 1 else f"{record_id} (piece {n} of {len(spans)})"
            answers = []
            for part in parts:
                answers.append((yield from self._ask(part, text[start:end], who, prov, usage)))
            if len(spans) == 1 and len(answers) == 1 and parts[0].schema is sch:
                data = answers[0]  # strategy single: already validated against the whole schema
            else:
                pieces.append({k: v for a in answers for k, v in a.model_dump(mode="json").items()})
        if pieces:
            merged = pieces[0] if len(pieces) == 1 else merge_answers(
                pieces, sch.json_schema, [text[a:b] for a, b in spans]
            )
            try:
                data = sch.model.model_validate(merged)  # the parts are valid, so the whole is, mostly
            except ValidationError as exc:
                raise OutputInvalid(
                    f"record {record_id}: the answers of its {len(spans)} pieces, merged, do not follow "
                    f"schema {sch.name} ({_error_summary(exc)})"
                ) from None
        dumped = data.model_dump(mode="json")
        evidence = locate(dumped, sch.json_schema, text)
        prov.ungrounded_fields = unsupported_paths(dumped, sch.json_schema, evidence)
        if self.grounding == "drop" and prov.ungrounded_fields:
            prov.dropped_fields = prov.ungrounded_fields
            dumped = drop_unsupported(dumped, sch.json_schema, prov.ungrounded_fields)
            data = sch.model.model_validate(dumped)
            evidence = locate(dumped, sch.json_schema, text)  # list items moved up: paths changed
        prov.llm_calls = usage.calls
        prov.usage = usage.as_dict()
        prov.latency_ms = (time.perf_counter() - started) * 1000
        return Extraction(data=data, schema=sch, provenance=prov, evidence=evidence)

    # ------------------------------------------------------------------ one call

    def _ask(
        self, part: _Part, text: str, record_id: str, prov: Provenance, usage: Usage
    ) -> Generator[_Call, Completion | ContextExceeded, BaseModel]:
        """One part, with truncation and re-ask handling; returns the validated answer."""
        sch = part.schema
        messages = self._messages(part, text)
        base_len = len(messages)
        max_tokens = self._answer_budget()
        reasks_left = self.reasks
        min_prompt_tokens = _min_prompt_tokens(messages)  # re-asks only add to the prompt
        estimated = _estimate_prompt(messages)
        while True:
            completion = yield (messages, sch, max_tokens, prov, base_len - 1)
            if isinstance(completion, ContextExceeded):
                raise completion
            usage.add(completion)
            _check_prompt_read(completion, min_prompt_tokens, prov.endpoint, record_id)
            self._observe_tokens(completion.prompt_tokens, estimated)
            prov.model = completion.model
            prov.finish_reason = completion.finish_reason
            if completion.finish_reason == "length":
                prov.truncations += 1
                if is_runaway(completion.content):
                    kept = self._kept_of_runaway(completion.content, sch)
                    if kept is None:
                        raise OutputTruncated(
                            f"record {record_id}: the model repeated itself until max_tokens={max_tokens} "
                            f"and nothing complete was left of its answer"
                        )
                    prov.runaway_answers += 1
                    return kept
                room = self._room_for_answer(messages)
                if max_tokens >= min(self.max_tokens_cap, room):
                    raise OutputTruncated(
                        f"record {record_id}: answer still cut off at max_tokens={max_tokens} "
                        f"(raise MEDQ_LLM__MAX_TOKENS_CAP, or the server's context)"
                    )
                max_tokens = min(max_tokens * 2, self.max_tokens_cap, room)
                continue
            try:
                return sch.validate_json(_strip_fences(completion.content))
            except ValidationError as exc:
                if reasks_left <= 0:
                    raise OutputInvalid(
                        f"record {record_id}: answer did not follow schema {sch.name} after "
                        f"{prov.reasks} re-asks ({_error_summary(exc)})"
                    ) from None  # pydantic's text repeats the model's output
                reasks_left -= 1
                prov.reasks += 1
                messages = messages[:base_len] + [
                    {"role": "assistant", "content": completion.content},
                    {"role": "user", "content": REASK_PROMPT.format(errors=_error_lines(exc))},
                ]

    def _kept_of_runaway(self, content: str, sch: ExtractionSchema) -> BaseModel | None:
        """What was complete of an answer that looped, its lists without repeats, if valid."""
        found = salvage(_strip_fences(content))
        if not isinstance(found, dict):
            return None
        try:
            return sch.model.model_validate(complete_missing(dedupe_lists(found), sch.json_schema))
        except ValidationError:
            return None

    # The two drivers of one call: the request is built, and a refusal read, by the same
    # steps (_request, _refused); only how the client is called differs.
    def _call(
        self, messages: list[dict[str, str]], sch: ExtractionSchema, max_tokens: int, prov: Provenance, fixed: int
    ) -> Completion | ContextExceeded:
        while True:
            mode, ask = self._request(messages, sch, max_tokens, fixed)
            try:
                return self._answered(mode, prov, self.client.complete(messages, **ask))
            except (FormatRejected, ContextExceeded) as exc:
                if (refused := self._refused(mode, exc)) is not None:
                    return refused

    async def _acall(
        self, messages: list[dict[str, str]], sch: ExtractionSchema, max_tokens: int, prov: Provenance, fixed: int
    ) -> Completion | ContextExceeded:
        while True:
            mode, ask = self._request(messages, sch, max_tokens, fixed)
            try:
                return self._answered(mode, prov, await self.aclient.complete(messages, **ask))
            except (FormatRejected, ContextExceeded) as exc:
                if (refused := self._refused(mode, exc)) is not None:
                    return refused

    def _request(
        self, messages: list[dict[str, str]], sch: ExtractionSchema, max_tokens: int, fixed: int
    ) -> tuple[str, dict[str, Any]]:
        """The response_format mode tried now, and the client's keyword arguments: the
        timeout follows the endpoint's measured speed for this prompt and answer."""
        mode = self._format
        if self._auto_format and (known := self.client.usable_format(mode)) != mode:
            self._step_down(mode, known)  # another worker found it refused: not asked again here
            mode = self._format
        prompt_tokens = self._real_tokens(_estimate_prompt(messages))
        timeout_s = self.speed.timeout_for(prompt_tokens, max_tokens)
        return mode, {
            "response_format": self._response_format(mode, sch),
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "fixed": fixed,
            "timeout_s": timeout_s,
            "format_mode": mode,
            "first_token_s": self.speed.first_token_for(prompt_tokens),  # streamed calls (the engine's)
        }

    def _answered(self, mode: str, prov: Provenance, completion: Completion) -> Completion:
        prov.response_format = mode
        self._observe_speed(completion)
        return completion

    def _refused(self, mode: str, exc: FormatRejected | ContextExceeded) -> ContextExceeded | None:
        """A prompt too long goes back to the extraction (which reads it: pieces, smaller);
        a refused response_format steps down to the next (None: ask again), or raises."""
        if isinstance(exc, ContextExceeded):
            return exc
        if not self._step_down(mode):
            raise exc
        return None

    def _response_format(self, mode: str, sch: ExtractionSchema) -> dict[str, Any] | None:
        """Built once per (mode, schema): the grammar form walks the whole schema."""
        key = (mode, sch.name, sch.version)
        if key not in self._formats:
            self._formats[key] = response_format_for(mode, sch.name, sch.json_schema)
        return self._formats[key]

    def _step_down(self, failed_mode: str, to: str | None = None) -> bool:
        """Move to the next looser response_format (or to ``to``); False when there is none
        or auto is off. The endpoint's state keeps a refusal for every worker (the client)."""
        if not self._auto_format:
            return False
        with self._lock:
            if self._format != failed_mode:  # another thread already stepped down
                return True
            i = RESPONSE_FORMATS.index(failed_mode)
            if i + 1 >= len(RESPONSE_FORMATS):
                return False
            self._format = to or RESPONSE_FORMATS[i + 1]
            return True

    # ------------------------------------------------------------------ the context

    def _answer_budget(self) -> int:
        """max_tokens of a first call: the setting, but at most a quarter of a known context."""
        ctx = self.context_tokens
        return self.max_tokens if ctx is None else max(min(self.max_tokens, ctx // 4), 1)

    def _room_for_answer(self, messages: list[dict[str, str]]) -> int:
        """How many tokens an answer may take beside this prompt in the context."""
        ctx = self.context_tokens
        if ctx is None:
            return self.max_tokens_cap
        return max(ctx - self._real_tokens(_estimate_prompt(messages)) - _CONTEXT_MARGIN, 1)

    def _real_tokens(self, estimated: int) -> int:
        return int(estimated * self._token_ratio) + 1

    def _observe_tokens(self, server_count: int, estimated: int) -> None:
        """The server counts this prompt's tokens: the estimate's scale grows to match
        (never shrinks: a piece cut too small costs a call, one cut too large a refusal)."""
        if server_count <= 0 or estimated < _MIN_CHECKED_PROMPT_TOKENS:
            return
        ratio = server_count / estimated
        if ratio > self._token_ratio:
            with self._lock:
                self._token_ratio = min(max(self._token_ratio, ratio), _TOKEN_RATIO_MAX)

    def _observe_speed(self, completion: Completion) -> None:
        if completion.latency_ms > 0:
            self.speed.observe(completion.latency_ms / 1000, completion.prompt_tokens, completion.completion_tokens)

    def _pieces(self, text: str, sch: ExtractionSchema, record_id: str) -> tuple[list[_Part], list[tuple[int, int]]]:
        """The prompts, and the note whole or in pieces that fit the context with the prompt
        and the answer. In a context too small for the schema's examples beside a piece of
        reasonable size, the examples go first."""
        parts = self._parts_for(sch, self.few_shot)
        ctx = self.context_tokens
        if ctx is None:
            return parts, [(0, len(text))]
        room = self._room_for_note(ctx, sch, self.few_shot)
        if room < _MIN_PIECE_TOKENS and self.few_shot and sch.examples:
            parts = self._parts_for(sch, False)
            room = self._room_for_note(ctx, sch, False)
        if room < _MIN_PIECE_TOKENS:
            raise EndpointMisconfigured(
                f"record {record_id}: {self.base_url}'s context of {ctx} tokens leaves no room for the note beside "
                f"the prompt and the answer; raise the server's context (e.g. OLLAMA_CONTEXT_LENGTH, llama-server -c) "
                f"or MEDQ_LLM__CONTEXT_TOKENS, then medq requeue"
            )
        return parts, split_note(text, int(room))

    def _room_for_note(self, ctx: int, sch: ExtractionSchema, few_shot: bool) -> float:
        """Tokens (medq's estimate) a piece of note may take beside the longest prompt."""
        key = (sch.name, sch.version, few_shot)
        fixed = self._fixed_tokens.get(key)
        if fixed is None:  # once per schema version, as the prompts themselves
            parts = self._parts_for(sch, few_shot)
            fixed = self._fixed_tokens[key] = max(_estimate_prompt(self._messages(part, "")) for part in parts)
        return (ctx - self._answer_budget() - _CONTEXT_MARGIN) / self._token_ratio - fixed

    def _messages(self, part: _Part, text: str) -> list[dict[str, str]]:
        user = text if part.question is None else FIELD_QUESTION.format(
            text=text, question=part.question, shape=_shape(part.schema), schema=part.schema_json
        )
        return [{"role": "system", "content": part.system}, *part.shots, {"role": "user", "content": user}]

    # ------------------------------------------------------------------ prompts

    def _parts_for(self, sch: ExtractionSchema, few_shot: bool) -> list[_Part]:
        """Built once per schema version (prompts, sub-schemas and their pydantic models)."""
        key = (sch.name, sch.version, few_shot)
        parts = self._parts.get(key)
        if parts is None:
            parts = self._build_parts(sch, few_shot)
            with self._lock:
                self._parts[key] = parts
        return parts

    def _build_parts(self, sch: ExtractionSchema, few_shot: bool) -> list[_Part]:
        examples = sch.examples if few_shot else ()
        if self.strategy == "single":
            instructions = (sch.instructions + "\n") if sch.instructions else ""
            system = SINGLE_SYSTEM.format(
                description=(sch.description + "\n") if sch.description else "",
                instructions=instructions,
                field_lines=_field_lines(sch),
            ) + (SINGLE_SCHEMA.format(schema=json.dumps(sch.json_schema, ensure_ascii=False)) if self.schema_in_prompt else "")
            shots: list[dict[str, str]] = []
            for ex in examples:
                shots += [
                    {"role": "user", "content": ex["text"]},
                    {"role": "assistant", "content": json.dumps(ex["data"], ensure_ascii=False)},
                ]
            return [_Part(sch, system, None, tuple(shots))]
        # Examples go into the system turn, whole, so that it stays the same for every
        # field and every record (a shared, cached prefix), rather than as per-field turns.
        system = FIELD_SYSTEM + (f"\n{sch.instructions}" if sch.instructions else "") + "".join(
            FIELD_EXAMPLE.format(text=ex["text"], data=json.dumps(ex["data"], ensure_ascii=False)) for ex in examples
        )
        parts = []
        for name in sch.field_names:
            prop = sch.fields[name]
            sub = build_schema(
                {"name": f"{sch.name}__{name.lower()}", "version": sch.version, "fields": {name: prop}},
                source=f"{sch.name}.{name}",
            )
            question = prop.get("description") or f"What is the {name.replace('_', ' ')}?"
            schema_json = json.dumps(sub.json_schema, ensure_ascii=False)
            parts.append(_Part(sub, system, question, (), schema_json))
        return parts


# Long notes: how the context is shared out (see MedicalDataProcessor._pieces).
_TOKEN_RATIO_START = 1.25  # real tokenizers count clinical text more thickly than chars / 4
_TOKEN_RATIO_MAX = 4.0
_CONTEXT_MARGIN = 64  # chat-template tokens and rounding
_MIN_PIECE_TOKENS = 200  # a piece smaller than this is no way to read a note
_CONTEXT_GUESS = 4096  # a refusal that names no size: a common default to start from
_CONTEXT_LEARNING_TRIES = 3
_TOKENS_PER_MESSAGE = 8  # role markers of a chat template


def _estimate_prompt(messages: list[dict[str, str]]) -> int:
    return sum(estimate_text_tokens(m["content"]) + _TOKENS_PER_MESSAGE for m in messages)


# A lower bound of any tokenizer's count: real ones take 2-5 UTF-8 bytes a token for
# notes, prompts and JSON (whitespace runs, which some merge into one token, are counted
# as one byte). Below the minimum the bound says too little to judge by.
_BYTES_PER_TOKEN_MAX = 8
_MIN_CHECKED_PROMPT_TOKENS = 256


def _min_prompt_tokens(messages: list[dict[str, str]]) -> int:
    size = sum(len(" ".join(m["content"].split()).encode("utf-8")) for m in messages)
    return size // _BYTES_PER_TOKEN_MAX


def _check_prompt_read(completion: Completion, min_prompt_tokens: int, endpoint: str, record_id: str) -> None:
    """Ollama (and llama.cpp servers of old) cut a prompt longer than their context
    without an error and answer from what is left: a confident extraction from part of
    the note. The server's own count of the prompt tokens it read gives it away.
    0 means the server reports no usage, which is not a cut."""
    read = completion.prompt_tokens
    if min_prompt_tokens < _MIN_CHECKED_PROMPT_TOKENS or read <= 0 or read >= min_prompt_tokens:
        return
    raise PromptTruncated(
        f"record {record_id}: {endpoint} read {read} of at least {min_prompt_tokens} prompt tokens, so it cut "
        f"the note; raise the server's context (e.g. OLLAMA_CONTEXT_LENGTH, llama-server -c), then medq requeue",
        read,
    )


def _type_words(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "one of " + ", ".join("null" if v is None else str(v) for v in prop["enum"])
    t = prop.get("type")
    types = t if isinstance(t, list) else [t]
    words = []
    for one in types:
        if one == "array":
            items = prop.get("items", {})
            inner = ", ".join(items.get("properties", {})) if "properties" in items else _type_words(items)
            words.append(f"list of {{{inner}}}" if "properties" in items else f"list of {inner}")
        elif one == "object":
            words.append("object with " + ", ".join(prop.get("properties", {})))
        else:
            words.append(str(one))
    return " or ".join(words)


def _field_lines(sch: ExtractionSchema) -> str:
    lines = []
    for name in sch.field_names:
        prop = sch.fields[name]
        desc = prop.get("description", "")
        lines.append(f"- {name} ({_type_words(prop)}): {desc}".rstrip(": "))
    return "\n".join(lines)


def _placeholder(prop: dict[str, Any]) -> Any:
    if "enum" in prop:
        return "|".join("null" if v is None else str(v) for v in prop["enum"])
    t = prop.get("type")
    types = t if isinstance(t, list) else [t]
    main = next((x for x in types if x != "null"), "null")
    if main == "array":
        return [_placeholder(prop.get("items", {}))]
    if main == "object":
        return {k: _placeholder(v) for k, v in prop.get("properties", {}).items()}
    return f"<{' or '.join(str(x) for x in types)}>"


def _shape(sch: ExtractionSchema) -> str:
    """A one-line picture of the answer, e.g. {"age": "<integer or null>"}."""
    return json.dumps({n: _placeholder(sch.fields[n]) for n in sch.field_names}, ensure_ascii=False)


def _strip_fences(content: str) -> str:
    """Models without constrained decoding often wrap JSON in ``` fences."""
    s = content.strip()
    if s.startswith("```"):
        s = s.split("\n", 1)[1] if "\n" in s else s[3:]
        if s.rstrip().endswith("```"):
            s = s.rstrip()[:-3]
    return s.strip()


def _loc(err: Any) -> str:
    return ".".join(str(p) for p in err.get("loc", ())) or "(root)"


def _error_lines(exc: ValidationError) -> str:
    return "\n".join(f"- {_loc(e)}: {e['msg']}" for e in exc.errors(include_input=False, include_url=False)[:20])


def _error_summary(exc: ValidationError) -> str:
    errs = exc.errors(include_input=False, include_url=False)
    if errs and errs[0].get("type") == "json_invalid":
        return "not valid JSON"
    locs = sorted({_loc(e) for e in errs})
    more = f" and {len(locs) - 5} more" if len(locs) > 5 else ""
    return f"{len(errs)} errors at {', '.join(locs[:5])}{more}"
