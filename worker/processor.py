"""``MedicalDataProcessor``: one note + one schema -> validated data + provenance.

The loop, per call to :meth:`MedicalDataProcessor.process`:

1. ask for schema-constrained JSON in the form the endpoint accepts; a refused
   ``response_format`` steps down to the next form (remembered per processor);
2. ``finish_reason == "length"`` is truncation, not bad JSON: ask again with a
   doubled ``max_tokens``, up to ``max_tokens_cap``;
3. validate with pydantic; on errors, show the model its errors (field paths and
   messages, never values) and ask again, ``reasks`` times at most.

Endpoint errors (connection, timeout, 429, 5xx) propagate as ``RetryableError``:
retrying a whole job is the task's business, with backoff, not this loop's.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from medq.errors import InvalidRecord, OutputInvalid, OutputTruncated
from medq.schemas import ExtractionSchema, SchemaLoader
from worker.llm import RESPONSE_FORMATS, Completion, FormatRejected, LLMClient, Usage, response_format_for

SYSTEM_PROMPT = """You extract structured data from clinical notes.
{description}{instructions}
Reply with one JSON object and nothing else. It must follow the JSON Schema below:
every key present, null where the note does not say, empty lists where nothing is mentioned.
Copy values from the note; never invent them.
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
    llm_calls: int = 0
    reasks: int = 0
    truncations: int = 0
    finish_reason: str | None = None
    latency_ms: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "endpoint": self.endpoint,
            "response_format": self.response_format,
            "llm_calls": self.llm_calls,
            "reasks": self.reasks,
            "truncations": self.truncations,
            "finish_reason": self.finish_reason,
            "latency_ms": round(self.latency_ms, 1),
            "usage": self.usage,
        }


@dataclass
class Extraction:
    data: BaseModel
    schema: ExtractionSchema
    provenance: Provenance

    def data_dict(self) -> dict[str, Any]:
        return self.data.model_dump(mode="json")


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
    ) -> None:
        self.base_url = base_url or "https://api.openai.com/v1"
        self.schema_loader = schema_loader or SchemaLoader()
        self.client = LLMClient(self.base_url, api_key, model, timeout_s)
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_tokens_cap = max(max_tokens_cap, max_tokens)
        self.reasks = reasks
        if response_format != "auto" and response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be auto or one of {RESPONSE_FORMATS}")
        self._auto_format = response_format == "auto"
        self._format = RESPONSE_FORMATS[0] if self._auto_format else response_format
        self._format_lock = threading.Lock()
        self._system_prompts: dict[tuple[str, int], str] = {}

    @classmethod
    def from_settings(cls, settings: Any, schema_loader: SchemaLoader | None = None) -> MedicalDataProcessor:
        llm = settings.llm
        return cls(
            llm.model,
            llm.api_key.get_secret_value(),
            llm.base_url,
            schema_loader or SchemaLoader(settings.schema_dirs),
            response_format=llm.response_format,
            timeout_s=llm.timeout_s,
            temperature=llm.temperature,
            max_tokens=llm.max_tokens,
            max_tokens_cap=llm.max_tokens_cap,
            reasks=llm.reasks,
        )

    @property
    def response_format(self) -> str:
        return self._format

    def process(self, text: str, schema: str | ExtractionSchema, record_id: str = "?") -> Extraction:
        """Extract ``schema`` from ``text``. Raises ``RetryableError`` or ``PermanentError``."""
        sch = schema if isinstance(schema, ExtractionSchema) else self.schema_loader.get(schema)
        if not text or not text.strip():
            raise InvalidRecord(f"record {record_id}: text is empty")
        started = time.perf_counter()
        usage = Usage()
        prov = Provenance(model=self.model, endpoint=self.base_url, response_format=self._format)
        messages = [
            {"role": "system", "content": self._system_prompt(sch)},
            {"role": "user", "content": text},
        ]
        max_tokens = self.max_tokens
        reasks_left = self.reasks
        while True:
            completion = self._call(messages, sch, max_tokens, prov)
            usage.add(completion)
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
                data = sch.validate_json(_strip_fences(completion.content))
            except ValidationError as exc:
                if reasks_left <= 0:
                    raise OutputInvalid(
                        f"record {record_id}: answer did not follow schema {sch.name} after "
                        f"{prov.reasks} re-asks ({_error_summary(exc)})"
                    ) from None  # pydantic's text repeats the model's output
                reasks_left -= 1
                prov.reasks += 1
                messages = messages[:2] + [
                    {"role": "assistant", "content": completion.content},
                    {"role": "user", "content": REASK_PROMPT.format(errors=_error_lines(exc))},
                ]
                continue
            prov.llm_calls = usage.calls
            prov.usage = usage.as_dict()
            prov.latency_ms = (time.perf_counter() - started) * 1000
            return Extraction(data=data, schema=sch, provenance=prov)

    def _call(self, messages: list[dict[str, str]], sch: ExtractionSchema, max_tokens: int, prov: Provenance) -> Completion:
        while True:
            mode = self._format
            try:
                completion = self.client.complete(
                    messages,
                    response_format=response_format_for(mode, sch.name, sch.json_schema),
                    max_tokens=max_tokens,
                    temperature=self.temperature,
                )
                prov.response_format = mode
                return completion
            except FormatRejected:
                if not self._step_down(mode):
                    raise

    def _step_down(self, failed_mode: str) -> bool:
        """Move to the next looser response_format; False when there is none or auto is off."""
        if not self._auto_format:
            return False
        with self._format_lock:
            if self._format != failed_mode:  # another thread already stepped down
                return True
            i = RESPONSE_FORMATS.index(failed_mode)
            if i + 1 >= len(RESPONSE_FORMATS):
                return False
            self._format = RESPONSE_FORMATS[i + 1]
            return True

    def _system_prompt(self, sch: ExtractionSchema) -> str:
        key = (sch.name, sch.version)
        prompt = self._system_prompts.get(key)
        if prompt is None:
            prompt = SYSTEM_PROMPT.format(
                description=(sch.description + "\n") if sch.description else "",
                instructions=(sch.instructions + "\n") if sch.instructions else "",
                schema=json.dumps(sch.json_schema, ensure_ascii=False),
            )
            self._system_prompts[key] = prompt
        return prompt


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
