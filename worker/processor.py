"""``MedicalDataProcessor``: one note + one schema -> validated data + provenance.

The loop, per call to the model:

1. ask for schema-constrained JSON in the form the endpoint accepts; a refused
   ``response_format`` steps down to the next form (remembered per processor);
2. ``finish_reason == "length"`` is truncation, not bad JSON: ask again with a
   doubled ``max_tokens``, up to ``max_tokens_cap``;
3. validate with pydantic; on errors, show the model its errors (field paths and
   messages, never values) and ask again, ``reasks`` times at most.

Before any of that, an answer whose ``usage.prompt_tokens`` is below a safe lower
bound of the prompt's size fails as ``PromptTruncated``: the server cut the prompt
to its context and answered from part of the note.

Strategies: ``single`` asks for the whole schema in one call; ``fields`` asks one
question per top-level field, each with a small schema, and merges the answers.
Which is better depends on the model: measure with ``medq demo`` / ``medq eval``
(README, "Extraction quality": on SmolLM2-135M, single scored higher and took less
time). The schema's ``examples`` are shown as few-shot turns. Then every value is
located in the note (``worker.evidence``): the spans are the result's ``evidence``,
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

from medq.errors import InvalidRecord, OutputInvalid, OutputTruncated, PromptTruncated
from medq.schemas import ExtractionSchema, SchemaLoader, build_schema
from medq.settings import EndpointSettings
from medq.urls import redact_url
from worker.evidence import Evidence, drop_unsupported, locate, unsupported_paths
from worker.llm import (
    RESPONSE_FORMATS,
    AsyncLLMClient,
    Completion,
    FormatRejected,
    LLMClient,
    Usage,
    response_format_for,
)
from worker.rate_limit import EndpointGate

_UNSET = object()
Strategy = Literal["single", "fields"]
Grounding = Literal["flag", "drop"]

SINGLE_SYSTEM = """You extract structured data from clinical notes.
{description}{instructions}Fields:
{field_lines}
Reply with one JSON object and nothing else, with every field present.
Copy values exactly as written in the note. Use null, or [] for a list, when the note does not say. Never invent values.
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

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latency_ms": round(self.latency_ms, 1)}


@dataclass
class Extraction:
    """``data`` (validated), ``evidence`` (path -> ``[[start, end], ...]`` offsets into the
    note, for each value found in it: see ``worker.evidence``) and ``provenance``."""

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
        temperature: float = 0.0,
        max_tokens: int = 1024,
        max_tokens_cap: int = 4096,
        reasks: int = 2,
        strategy: Strategy = "single",
        few_shot: bool = True,
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
        self.grounding = grounding
        if response_format != "auto" and response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be auto or one of {RESPONSE_FORMATS}")
        self._auto_format = response_format == "auto"
        self._format = RESPONSE_FORMATS[0] if self._auto_format else response_format
        self._lock = threading.Lock()
        self._parts: dict[tuple[str, int], list[_Part]] = {}
        self._formats: dict[tuple[str, str, int], Any] = {}
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
            temperature=llm.temperature,
            max_tokens=llm.max_tokens,
            max_tokens_cap=llm.max_tokens_cap,
            reasks=llm.reasks,
            strategy=llm.strategy,
            few_shot=llm.few_shot,
            grounding=llm.grounding,
            gate=gate,
        )

    @property
    def response_format(self) -> str:
        return self._format

    def process(self, text: str, schema: str | ExtractionSchema, record_id: str = "?") -> Extraction:
        """Extract ``schema`` from ``text``. Raises ``RetryableError`` or ``PermanentError``."""
        steps = self._steps(text, schema, record_id)
        try:
            call = next(steps)
            while True:
                call = steps.send(self._call(*call))
        except StopIteration as done:
            result: Extraction = done.value
            return result

    async def aprocess(self, text: str, schema: str | ExtractionSchema, record_id: str = "?") -> Extraction:
        """:meth:`process` on the running asyncio loop (the worker engine's way)."""
        steps = self._steps(text, schema, record_id)
        try:
            call = next(steps)
            while True:
                call = steps.send(await self._acall(*call))
        except StopIteration as done:
            result: Extraction = done.value
            return result

    # The extraction is written once, as a generator that yields each model call it
    # needs and is sent the completion; process() and aprocess() only differ in how
    # they make the call.
    def _steps(self, text: str, schema: str | ExtractionSchema, record_id: str) -> Generator[_Call, Completion, Extraction]:
        sch = schema if isinstance(schema, ExtractionSchema) else self.schema_loader.get(schema)
        if not text or not text.strip():
            raise InvalidRecord(f"record {record_id}: text is empty")
        started = time.perf_counter()
        usage = Usage()
        prov = Provenance(model=self.model, endpoint=self.base_url, response_format=self._format, strategy=self.strategy)
        parts = self._parts_for(sch)
        answers = []
        for part in parts:
            answers.append((yield from self._ask(part, text, record_id, prov, usage)))
        if len(answers) == 1 and parts[0].schema is sch:
            data = answers[0]  # strategy single: already validated against the whole schema
        else:
            merged = {k: v for a in answers for k, v in a.model_dump(mode="json").items()}
            data = sch.model.model_validate(merged)  # the parts are valid, so the whole is
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
    ) -> Generator[_Call, Completion, BaseModel]:
        """One part, with truncation and re-ask handling; returns the validated answer."""
        sch = part.schema
        user = text if part.question is None else FIELD_QUESTION.format(
            text=text, question=part.question, shape=_shape(sch), schema=part.schema_json
        )
        messages = [{"role": "system", "content": part.system}, *part.shots, {"role": "user", "content": user}]
        base_len = len(messages)
        max_tokens = self.max_tokens
        reasks_left = self.reasks
        min_prompt_tokens = _min_prompt_tokens(messages)  # re-asks only add to the prompt
        while True:
            completion = yield (messages, sch, max_tokens, prov, base_len - 1)
            usage.add(completion)
            _check_prompt_read(completion, min_prompt_tokens, prov.endpoint, record_id)
            prov.model = completion.model
            prov.finish_reason = completion.finish_reason
            if completion.finish_reason == "length":
                prov.truncations += 1
                if max_tokens >= self.max_tokens_cap:
                    raise OutputTruncated(
                        f"record {record_id}: answer still cut off at max_tokens={max_tokens} "
                        f"(raise MEDQ_LLM__MAX_TOKENS_CAP)"
                    )
                max_tokens = min(max_tokens * 2, self.max_tokens_cap)
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

    def _call(
        self, messages: list[dict[str, str]], sch: ExtractionSchema, max_tokens: int, prov: Provenance, fixed: int
    ) -> Completion:
        while True:
            mode = self._format
            try:
                completion = self.client.complete(
                    messages,
                    response_format=self._response_format(mode, sch),
                    max_tokens=max_tokens,
                    temperature=self.temperature,
                )
                prov.response_format = mode
                return completion
            except FormatRejected:
                if not self._step_down(mode):
                    raise

    async def _acall(
        self, messages: list[dict[str, str]], sch: ExtractionSchema, max_tokens: int, prov: Provenance, fixed: int
    ) -> Completion:
        while True:
            mode = self._format
            try:
                completion = await self.aclient.complete(
                    messages,
                    response_format=self._response_format(mode, sch),
                    max_tokens=max_tokens,
                    temperature=self.temperature,
                    fixed=fixed,
                )
                prov.response_format = mode
                return completion
            except FormatRejected:
                if not self._step_down(mode):
                    raise

    def _response_format(self, mode: str, sch: ExtractionSchema) -> dict[str, Any] | None:
        """Built once per (mode, schema): the grammar form walks the whole schema."""
        key = (mode, sch.name, sch.version)
        fmt = self._formats.get(key, _UNSET)
        if fmt is _UNSET:
            fmt = self._formats[key] = response_format_for(mode, sch.name, sch.json_schema)
        return fmt  # type: ignore[return-value]

    def _step_down(self, failed_mode: str) -> bool:
        """Move to the next looser response_format; False when there is none or auto is off."""
        if not self._auto_format:
            return False
        with self._lock:
            if self._format != failed_mode:  # another thread already stepped down
                return True
            i = RESPONSE_FORMATS.index(failed_mode)
            if i + 1 >= len(RESPONSE_FORMATS):
                return False
            self._format = RESPONSE_FORMATS[i + 1]
            return True

    # ------------------------------------------------------------------ prompts

    def _parts_for(self, sch: ExtractionSchema) -> list[_Part]:
        """Built once per schema version (prompts, sub-schemas and their pydantic models)."""
        key = (sch.name, sch.version)
        parts = self._parts.get(key)
        if parts is None:
            parts = self._build_parts(sch)
            with self._lock:
                self._parts[key] = parts
        return parts

    def _build_parts(self, sch: ExtractionSchema) -> list[_Part]:
        examples = sch.examples if self.few_shot else ()
        if self.strategy == "single":
            instructions = (sch.instructions + "\n") if sch.instructions else ""
            system = SINGLE_SYSTEM.format(
                description=(sch.description + "\n") if sch.description else "",
                instructions=instructions,
                field_lines=_field_lines(sch),
                schema=json.dumps(sch.json_schema, ensure_ascii=False),
            )
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
        f"the note; raise the server's context (e.g. OLLAMA_CONTEXT_LENGTH, llama-server -c), then medq requeue"
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
