"""The OpenAI-compatible client, and the one place a model server's errors become ours.

Every local server medq targets (Ollama, vLLM, TGI, llama.cpp) speaks the OpenAI
chat-completions protocol: one JSON POST. A call is written once (:class:`_Client`:
the body, the lease, what an answer or a failed send becomes, the metrics) and sent
by two drivers: :class:`LLMClient` (the openai SDK, blocking: ``MedicalDataProcessor.process``,
``medq endpoints``) and :class:`AsyncLLMClient` (aiohttp, the worker engine). Error
answers go through :func:`error_for_status`, sends without one through
:func:`transport_error`. Neither retries: retries are the task's job.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai

from medq.core.errors import (
    ContextExceeded,
    EndpointMisconfigured,
    EndpointTimeout,
    EndpointUnavailable,
    MedqError,
    ModelNotFound,
    Overloaded,
    RateLimited,
    RequestRejected,
    ServerError,
)
from medq.core.urls import redact_url, split_credentials
from medq.state.endpoints import EndpointGate, estimate_tokens
from medq.state.metrics import metrics
from worker.llm.speed import work_units

log = logging.getLogger("medq.worker")

# 5xx bodies that mean "busy, come back later", not "broken": Ollama's queue full
# ("server busy ... maximum pending requests exceeded", "no slots available") and
# servers still loading their model (llama.cpp's 503 "Loading model", TGI, vLLM).
_BACKPRESSURE_WORDS = ("busy", "loading", "no slots", "overloaded", "unavailable", "try again")

# How a request asks for schema-constrained output, from most to least constrained.
# "json_schema": OpenAI, vLLM, Ollama; "json_object_schema": llama-cpp-python's server,
# which rejects json_schema but turns {"type": "json_object", "schema": ...} into a grammar;
# "tgi": Text Generation Inference, which takes {"type": "json", "value": schema} and answers
# 422 to both forms above ("unknown variant `json_schema`", "missing field `value`").
# "auto" walks this order and stays on the first form the endpoint accepts.
RESPONSE_FORMATS = ("json_schema", "json_object_schema", "tgi", "json_object", "none")

# An error's ``type`` / ``code`` short enough and plain enough to be a name, not prose:
# the only words of a server's error that medq repeats (see error_for_status).
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,40}")


@dataclass
class Completion:
    content: str
    finish_reason: str | None
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0

    def add(self, c: Completion) -> None:
        self.prompt_tokens += c.prompt_tokens
        self.completion_tokens += c.completion_tokens
        self.calls += 1

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "calls": self.calls,
        }


class StreamCut(Overloaded):
    """The server ended a streamed answer before its end: llama-cpp-python's server does
    when another request waits (``interrupt_requests``, its default). It works on one
    request at a time: the endpoint is marked so, and the call is made again."""


class FormatRejected(RequestRejected):
    """The endpoint refused the response_format; the caller may try a looser one.
    ``known``: not sent, the endpoint refused it before (its state in Redis says so)."""

    kind = "request_rejected"
    known = False


def format_rank(mode: str | None) -> int | None:
    """A response_format mode's place in :data:`RESPONSE_FORMATS` (higher: looser); None for none given."""
    return RESPONSE_FORMATS.index(mode) if mode in RESPONSE_FORMATS else None


def response_format_for(mode: str, name: str, schema: dict[str, Any]) -> dict[str, Any] | None:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": grammar_schema(schema)}
    if mode == "tgi":
        # The plain schema, not grammar_schema: TGI compiles it to a regex and then a
        # token automaton (outlines), which already puts ``enum`` before ``type``, and
        # the bounds grammar_schema adds would be unrolled there (maxItems copies an
        # item's regex 12 times, maxLength adds 120 states per string), a compile that
        # can pin TGI's CPU (huggingface/text-generation-inference#2681).
        return {"type": "json", "value": schema}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


# Bounds a grammar puts on a value the schema leaves open. A tiny model can loop inside
# an unterminated string or an endless list until max_tokens, and then again with the
# doubled budget; the grammar makes it close the value instead.
GRAMMAR_MAX_STRING_CHARS = 120
GRAMMAR_MAX_ITEMS = 12


def grammar_schema(schema: Any) -> Any:
    """The schema as llama.cpp's grammar converter needs it.

    Seen with llama-cpp-python 0.3.36: ``{"type": ["string", "null"], "enum": [...]}``
    becomes ``string | null`` and the enum is lost, while an ``enum`` alone becomes
    the exact alternatives (the enum already lists null where null is allowed).
    Strings and arrays get upper bounds unless the schema sets its own.
    """
    if isinstance(schema, list):
        return [grammar_schema(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: grammar_schema(v) for k, v in schema.items()}
    if "enum" in out:
        out.pop("type", None)
        return out
    t = out.get("type")
    types = t if isinstance(t, list) else [t]
    if "string" in types:
        out.setdefault("maxLength", GRAMMAR_MAX_STRING_CHARS)
    if "array" in types:
        out.setdefault("maxItems", GRAMMAR_MAX_ITEMS)
    return out


class _Client:
    """What both clients share: the endpoint as shown, the request body, and what an
    answer or a failed send becomes. Only sending the bytes differs (``LLMClient``:
    the openai SDK, blocking; ``AsyncLLMClient``: aiohttp, on the running loop), so a call's
    errors, metrics, redaction and lease are the same whichever path makes it.

    Redirects are not followed on either path: the privacy guard approved this
    endpoint, not wherever it points (a 3xx is an error, see :func:`error_for_status`).
    Userinfo in the URL is sent as basic auth and kept out of the URL requested (and so
    out of the transports' own errors)."""

    stream = False  # ask for streamed answers (AsyncLLMClient)

    def __init__(
        self, base_url: str, api_key: str, model: str, timeout_s: float = 120.0, gate: EndpointGate | None = None
    ) -> None:
        self.base_url = redact_url(base_url)  # as shown: in messages, metrics and results
        self.model = model
        self.gate = gate
        self.timeout_s = timeout_s
        url, basic = split_credentials(base_url)
        self._url = url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": basic or f"Bearer {api_key}", "Content-Type": "application/json"}
        self._encoded: dict[tuple[str, str], str] = {}
        self._formats: dict[int, tuple[Any, str]] = {}  # id -> (the dict, kept alive; its JSON)

    def _body(
        self,
        messages: list[dict[str, str]],
        response_format: dict[str, Any] | None,
        max_tokens: int,
        temperature: float,
        fixed: int = 0,
    ) -> str:
        """The request JSON, open at its end (:meth:`_closed` ends it). The first ``fixed`` messages (the system turn and the
        few-shot turns) and the response_format are the same for every record of a
        schema: they are encoded once and reused. Record text is never kept."""
        parts = []
        for i, m in enumerate(messages):
            if i >= fixed:  # the note and what follows it: never kept
                parts.append(json.dumps(m, ensure_ascii=False))
                continue
            key = (m["role"], m["content"])
            enc = self._encoded.get(key)
            if enc is None:
                if len(self._encoded) > 4096:
                    self._encoded.clear()
                enc = self._encoded[key] = json.dumps(m, ensure_ascii=False)
            parts.append(enc)
        fmt = ""
        if response_format is not None:
            held = self._formats.get(id(response_format))
            if held is None or held[0] is not response_format:
                held = self._formats[id(response_format)] = (response_format, json.dumps(response_format, ensure_ascii=False))
            fmt = f', "response_format": {held[1]}'
        head = json.dumps({"model": self.model, "max_tokens": max_tokens, "temperature": temperature}, ensure_ascii=False)
        return f'{head[:-1]}, "messages": [{", ".join(parts)}]{fmt}'

    @staticmethod
    def _closed(body: str, stream: bool) -> bytes:
        """The request body made by :meth:`_body`, for a streamed answer or a whole one."""
        return (body + (_STREAM_FIELDS if stream else "") + "}").encode()

    def _known_refused(self, format_mode: str | None) -> bool:
        """The endpoint refused this response_format before (any worker's call): not sent again."""
        rank = format_rank(format_mode)
        return self.gate is not None and rank is not None and self.gate.refused.format_rank >= rank

    def usable_format(self, mode: str) -> str:
        """``mode``, or the first looser one when the endpoint refused it before (its state in Redis)."""
        if self.gate is None or self.gate.refused.format_rank < (format_rank(mode) or 0):
            return mode
        return RESPONSE_FORMATS[min(self.gate.refused.format_rank + 1, len(RESPONSE_FORMATS) - 1)]

    def _streams(self) -> bool:
        return self.stream and not (self.gate is not None and self.gate.refused.stream)

    def _lease(
        self, messages: list[dict[str, str]], max_tokens: int, timeout_s: float | None
    ) -> tuple[int, float | None]:
        """What the gate is told before the call: its estimated tokens and how long it may hold the slot."""
        return estimate_tokens(messages, max_tokens), (timeout_s + 10 if timeout_s else None)

    def _failed(self, exc: BaseException) -> MedqError:
        """A send that got no answer, counted, as one of medq's errors."""
        err = transport_error(exc, self.base_url)
        metrics.incr("medq_llm_errors_total", endpoint=self.base_url, kind=err.kind)
        return err

    def _answer(self, status: int, headers: Any, raw: bytes, started: float) -> Completion:
        """An HTTP answer (sent at ``started``, ``time.perf_counter``) as a completion, or its error, counted."""
        where = self.base_url
        latency_ms = (time.perf_counter() - started) * 1000
        metrics.observe("medq_llm_request_seconds", latency_ms / 1000, endpoint=where)
        if status >= 300:
            err = error_for_status(status, headers, raw, where, self.model)
            metrics.incr("medq_llm_errors_total", endpoint=where, kind=err.kind)
            raise err
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        try:
            choice = doc["choices"][0]
            content = choice["message"].get("content") or ""
            usage = doc.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
            finish_reason, model = choice.get("finish_reason"), doc.get("model") or self.model
        except (TypeError, KeyError, IndexError, AttributeError, ValueError):
            raise ServerError(f"{where} answered HTTP {status} without a chat completion in it") from None
        metrics.incr("medq_llm_tokens_total", prompt_tokens, endpoint=where, direction="in")
        metrics.incr("medq_llm_tokens_total", completion_tokens, endpoint=where, direction="out")
        return Completion(content, finish_reason, model, prompt_tokens, completion_tokens, latency_ms)


def _settled(c: Completion) -> tuple[Completion, int, float]:
    """What the gate is told after a call: the tokens used and the work done (its latency signal)."""
    return c, c.prompt_tokens + c.completion_tokens, work_units(c.prompt_tokens, c.completion_tokens)


# What the SDK's ``post`` / ``get`` return when asked for the answer as it came:
# status, headers and body, unparsed.
_RAW = openai.APIResponse[bytes]
_OMIT: Any = openai.Omit()  # a header the SDK would add, left out


class LLMClient(_Client):
    """One endpoint, one model, blocking; thread-safe (the SDK's client is). For
    ``MedicalDataProcessor.process``, ``medq endpoints`` and ``medq bench``.

    Sent through the openai SDK's own ``post``, as bytes: the request is what
    :meth:`_body` makes for both paths (``chat.completions.create`` would walk the
    schema through the SDK's TypedDict transform, about 3 ms of CPU per call, medq
    bench), and the answer comes back raw, so the shared code reads it as it reads
    aiohttp's. The SDK's retries are off (``max_retries=0``): they would multiply the
    task's (3 SDK tries x 6 task tries = 18 calls).

    With a ``gate``, every call first takes a lease on the endpoint's shared limits
    (``medq.state.endpoints``) and reports back how it went."""

    def __init__(
        self, base_url: str, api_key: str, model: str, timeout_s: float = 120.0, gate: EndpointGate | None = None
    ) -> None:
        super().__init__(base_url, api_key, model, timeout_s, gate)
        self._sdk = openai.OpenAI(
            base_url=self._url.removesuffix("/chat/completions"),  # no userinfo: it is in the headers
            api_key=api_key or "unused",  # sent only as _headers say; the SDK refuses none at all
            timeout=timeout_s,
            max_retries=0,
            # Our Authorization (basic or bearer) over the SDK's; and no OPENAI_ORG_ID /
            # OPENAI_PROJECT_ID from the environment: no header the async path does not send.
            default_headers={**self._headers, "OpenAI-Organization": _OMIT, "OpenAI-Project": _OMIT},
        )

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        response_format: dict[str, Any] | None,
        max_tokens: int,
        temperature: float,
        fixed: int = 0,
        timeout_s: float | None = None,
        format_mode: str | None = None,
        first_token_s: float | None = None,
    ) -> Completion:
        """``fixed``: how many leading messages are the same for every record (see ``_body``);
        ``timeout_s``: this call's (default: the client's); ``format_mode``: the
        RESPONSE_FORMATS mode ``response_format`` is in, so that one the endpoint refused
        before is not sent, and one it refuses now is remembered for every worker.
        ``first_token_s``: for a streamed call; this path does not stream."""
        data = self._closed(self._body(messages, response_format, max_tokens, temperature, fixed), False)
        if self.gate is None:
            return self._post(data, timeout_s)
        gate = self.gate

        def call() -> tuple[Completion, int, float]:
            if self._known_refused(format_mode):
                raise _known_refusal(self.base_url)
            try:
                return _settled(self._post(data, timeout_s))
            except FormatRejected:
                gate.learn_refusal(format_rank=format_rank(format_mode))
                raise

        est_tokens, lease_s = self._lease(messages, max_tokens, timeout_s)
        result: Completion = gate.call(est_tokens, call, lease_s)
        return result

    def _options(self, timeout_s: float | None) -> openai.RequestOptions:
        """Per call: its timeout, no redirects (see :class:`_Client`), no SDK retries."""
        return {"timeout": timeout_s or self.timeout_s, "follow_redirects": False, "max_retries": 0}

    def _send(self, method: str, url: str, data: bytes | None, timeout_s: float | None) -> tuple[int, Any, bytes]:
        """One request through the SDK, as (status, headers, raw body). An error answer is
        still an answer: the SDK raises it as ``APIStatusError`` with the response read,
        and it is handed on like any other for :func:`error_for_status` to read."""
        try:
            if method == "post":
                resp = self._sdk.post(url, cast_to=_RAW, content=data, options=self._options(timeout_s))
            else:
                resp = self._sdk.get(url, cast_to=_RAW, options=self._options(timeout_s))
            return resp.status_code, resp.headers, resp.read()
        except openai.APIStatusError as exc:
            return exc.status_code, exc.response.headers, exc.response.content

    def _post(self, data: bytes, timeout_s: float | None = None) -> Completion:
        started = time.perf_counter()
        try:
            status, headers, raw = self._send("post", self._url, data, timeout_s)
        except TRANSPORT_ERRORS as exc:
            raise self._failed(exc) from None  # the chain adds nothing medq's error does not say
        return self._answer(status, headers, raw, started)

    def get_json(self, path: str) -> Any:
        """``GET {base}/{path}`` (e.g. ``models``) as parsed JSON; an error answer as
        :func:`error_for_status` says, no answer as :func:`transport_error` says."""
        url = self._url.removesuffix("/chat/completions") + "/" + path
        try:
            status, headers, raw = self._send("get", url, None, None)
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self.base_url) from None
        if status >= 300:
            raise error_for_status(status, headers, raw, self.base_url, self.model)
        return json.loads(raw)

    def close(self) -> None:
        self._sdk.close()


class AsyncLLMClient(_Client):
    """The same calls as :class:`LLMClient`, on one asyncio loop, for the worker engine.

    A plain aiohttp POST, not the SDK: measured with 64 requests in flight, the SDK's
    async client spends 1.8 ms of CPU per call (0.24 ms for aiohttp alone), which
    would be most of a worker's time per job. Make it, and use it, inside one running
    loop (its session is made on first use, in that loop).

    Answers are **streamed** (``stream: true``; every server medq targets streams) and
    timed by progress, not by a deadline for the whole answer: the wait for the first
    token and each gap between chunks may last ``timeout_s`` (``MEDQ_LLM__TIMEOUT_S``),
    so a slow CPU server that keeps producing is never cut off, and a hung one is
    given up after that much silence. Giving up closes the stream, and llama.cpp's
    server, llama-cpp-python and vLLM then stop generating: an abandoned answer does
    not keep a one-slot server busy. Usage comes in the last chunk
    (``stream_options.include_usage``); a server that sends none gets its answer's
    chunks counted as tokens. A server that refuses a streamed request (a 4xx that a
    plain one does not get) is asked plainly, and every worker remembers it."""

    stream = True

    def __init__(
        self, base_url: str, api_key: str, model: str, timeout_s: float = 120.0, gate: EndpointGate | None = None
    ) -> None:
        super().__init__(base_url, api_key, model, timeout_s, gate)
        self._session: aiohttp.ClientSession | None = None

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        response_format: dict[str, Any] | None,
        max_tokens: int,
        temperature: float,
        fixed: int = 0,
        timeout_s: float | None = None,
        format_mode: str | None = None,
        first_token_s: float | None = None,
    ) -> Completion:
        """As :meth:`LLMClient.complete`. ``timeout_s`` bounds a plain (not streamed) answer
        only; a streamed one is bounded by its silences (see the class): ``first_token_s``
        (default ``timeout_s`` of the client) for the first token, which comes after the
        server has read the whole prompt, then the client's ``timeout_s`` between chunks."""
        body = self._body(messages, response_format, max_tokens, temperature, fixed)
        if self._known_refused(format_mode):
            raise _known_refusal(self.base_url)
        if self.gate is None:
            return await self._send(body, timeout_s, first_token_s)
        gate = self.gate

        async def call() -> tuple[Completion, int, float]:
            if self._known_refused(format_mode):  # the lease brought news: another worker learned it
                raise _known_refusal(self.base_url)
            try:
                return _settled(await self._send(body, timeout_s, first_token_s))
            except FormatRejected:
                await gate.alearn_refusal(format_rank=format_rank(format_mode))
                raise

        est_tokens, lease_s = self._lease(messages, max_tokens, timeout_s)
        try:
            result: Completion = await gate.acall(est_tokens, call, lease_s)
        except StreamCut:
            # Learned for every worker: one request at a time. This call waits its turn and
            # goes again (the one that cut it now runs alone: sent now, it would cut that one).
            await gate.alearn_refusal(company=True)
            result = await gate.acall(est_tokens, call, lease_s)
        return result

    async def _send(self, body: str, timeout_s: float | None, first_token_s: float | None = None) -> Completion:
        """Streamed if the endpoint takes it; a streamed request refused with a 4xx that
        the same request, plain, does not get, marks the endpoint as not streaming."""
        if not self._streams():
            return await self._post(self._closed(body, False), timeout_s)
        try:
            return await self._post_streamed(self._closed(body, True), timeout_s, first_token_s)
        except _EmptyStream:
            # llama-cpp-python ends a stream empty when the request fails (a prompt over its
            # context, a bad grammar): the plain request gets the error that says why. It
            # also resets the connection it ended, which aiohttp has put back in its pool by
            # then: a reset on reuse (nothing was read) is tried once more, on a new one.
            try:
                return await self._post(self._closed(body, False), timeout_s)
            except EndpointUnavailable:
                return await self._post(self._closed(body, False), timeout_s)
        except (FormatRejected, ContextExceeded, ModelNotFound):
            raise  # the request's fault, streamed or not
        except RequestRejected:
            answer = await self._post(self._closed(body, False), timeout_s)
            log.info("%s refused a streamed request and answered it plainly: not streaming to it", self.base_url)
            if self.gate is not None:
                await self.gate.alearn_refusal(stream=True)
            else:
                self.stream = False
            return answer

    async def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            )
        return self._session

    async def _post(self, data: bytes, timeout_s: float | None = None) -> Completion:
        session = await self._open_session()
        started = time.perf_counter()
        # Only when given: aiohttp reads timeout=None as "no timeout at all".
        per_call = {"timeout": aiohttp.ClientTimeout(total=timeout_s)} if timeout_s else {}
        try:
            async with session.post(
                self._url, data=data, headers=self._headers, allow_redirects=False, **per_call
            ) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except TRANSPORT_ERRORS as exc:
            raise self._failed(exc) from None
        return self._answer(status, headers, raw, started)

    async def _post_streamed(
        self, data: bytes, timeout_s: float | None = None, first_token_s: float | None = None
    ) -> Completion:
        """One streamed call: its chunks read as they come, each within the silence limit
        of the last, the first within ``first_token_s`` of sending (at least that limit).
        Leaving early (a timeout, a cancelled job) closes the connection, which tells the
        server to stop. ``timeout_s`` (the call's, for a whole answer) only shortens the
        client's silence limit."""
        session = await self._open_session()
        silence_s = min(timeout_s or self.timeout_s, self.timeout_s)
        first_s = max(first_token_s or silence_s, silence_s)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        stream = _Stream()
        try:
            # sock_read: the answer's head (sent with or before the first token) within silence_s
            async with session.post(
                self._url, data=data, headers=self._headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=silence_s, sock_read=first_s),
            ) as resp:
                if resp.status >= 300 or "text/event-stream" not in resp.headers.get("Content-Type", ""):
                    raw = await resp.read()  # an error, or a server that answered whole
                    return self._answer(resp.status, resp.headers, raw, started)
                heard = loop.time()  # the last chunk of the answer (pings and comments are not progress)
                rest = b""
                while not stream.done:
                    left = heard + (silence_s if stream.chunks or stream.usage else first_s) - loop.time()
                    if left <= 0:
                        raise asyncio.TimeoutError
                    data = await asyncio.wait_for(resp.content.readany(), left)  # what came, whole lines or not
                    if not data:
                        break
                    *lines, rest = (rest + data).split(b"\n")
                    if any([stream.feed(line) for line in lines]):
                        heard = loop.time()
        except TRANSPORT_ERRORS as exc:
            raise self._failed(exc) from None
        if stream.error is not None:
            return self._answer(500, {}, stream.error, started)
        if not stream.done and not stream.chunks and stream.usage is None:
            raise _EmptyStream  # asked again plainly (_send): the server's error, or its answer
        if stream.finish_reason is None:
            metrics.incr("medq_llm_errors_total", endpoint=self.base_url, kind=StreamCut.kind)
            raise StreamCut(f"{self.base_url} ended a streamed answer before its end (another request came: "
                            "it works on one at a time)")
        return self._answer(200, {}, stream.document(self.model), started)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# Asked of a streamed call: the usage in its last chunk (OpenAI's, vLLM's, llama.cpp's, Ollama's).
_STREAM_FIELDS = ', "stream": true, "stream_options": {"include_usage": true}'


class _Stream:
    """A streamed chat completion (server-sent events) put back together as the one
    document a plain call answers, so that :meth:`_Client._answer` reads both alike."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.chunks = 0  # chunks with content: the tokens, where the server says no usage
        self.finish_reason: str | None = None
        self.model = ""
        self.usage: dict[str, Any] | None = None
        self.error: bytes | None = None
        self.done = False

    def feed(self, line: bytes) -> bool:
        """One line of the stream; True when it carried the answer on (not a comment or a ping)."""
        text = line.strip()
        if not text.startswith(b"data:"):
            return False  # blank lines between events, ": ping" comments, "event:" names
        payload = text[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return True
        try:
            doc = json.loads(payload)
        except ValueError:
            return False
        if not isinstance(doc, dict):
            return False
        if "error" in doc:  # llama.cpp and vLLM report a failure mid-stream as a data event
            self.error, self.done = payload, True
            return True
        self.model = doc.get("model") or self.model
        if isinstance(doc.get("usage"), dict):
            self.usage = doc["usage"]
        for choice in doc.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if content:
                self.parts.append(content)
                self.chunks += 1
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return True

    def document(self, model: str) -> bytes:
        usage = self.usage or {"prompt_tokens": 0, "completion_tokens": self.chunks}
        return json.dumps({
            "model": self.model or model,
            "choices": [{"message": {"content": "".join(self.parts)}, "finish_reason": self.finish_reason}],
            "usage": usage,
        }, ensure_ascii=False).encode()


class _EmptyStream(Exception):
    """A streamed answer that ended without a chunk or its ``[DONE]``: ask plainly."""


def _known_refusal(where: str) -> FormatRejected:
    err = FormatRejected(f"{where} refused this response_format before; not sent again")
    err.known = True
    return err


# The transports' own errors for "no answer": every foreign error of a model call is
# translated here, by transport_error, and nowhere else (an answer, even the SDK's
# APIStatusError, is read by error_for_status). Timeouts first: the SDK's and aiohttp's
# timeouts are also their connection errors (subclasses).
_TIMEOUTS: tuple[type[BaseException], ...] = (asyncio.TimeoutError, openai.APITimeoutError, aiohttp.ServerTimeoutError)
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (*_TIMEOUTS, openai.APIConnectionError, aiohttp.ClientError)


def transport_error(exc: BaseException, where: str) -> MedqError:
    """A send to ``where`` that got no answer (one of :data:`TRANSPORT_ERRORS`) as medq's
    error: a timeout, or an endpoint that cannot be reached. The message names the
    foreign error's class, never its text (which may hold a URL or the server's words);
    for the SDK's ``APIConnectionError``, the class of the error under it (``ConnectError``),
    which says more than the SDK's one name for every failed connection."""
    if isinstance(exc, _TIMEOUTS):
        return EndpointTimeout(f"no answer from {where} within the timeout")
    cause = exc.__cause__ if isinstance(exc, openai.APIConnectionError) and exc.__cause__ is not None else exc
    return EndpointUnavailable(f"cannot connect to {where} ({type(cause).__name__})")


def error_for_status(status: int, headers: Any, body: Any, where: str, model: str = "") -> MedqError:
    """An HTTP error answer as one of medq's errors: the one table, for both clients.

    ``body``: the raw bytes (or, from tests, text or parsed JSON); ``model``: the one
    asked for, named by a "model not found" refusal. The message says what
    the server said in kind only: the status, the error's ``type`` / ``code`` when they
    are short names, and a digest of the body to find it in the server's own log. Never
    its text: servers quote the request, and so the note, in their errors (vLLM,
    llama.cpp, proxies), and no check can tell every quote (short lines, Chinese,
    JSON-escaped text) from the rest. The text is read here, to classify, and dropped."""
    retry_after_s = _retry_after_s(headers)
    doc = _parsed(body)
    lowered = _server_message(doc).lower()
    head = f"HTTP {status} from {where}"
    kind = f" ({_in_kind(doc, body)})"
    if 300 <= status < 400:
        return EndpointMisconfigured(
            f"{head}: medq does not follow redirects on model calls; point MEDQ_LLM__BASE_URL "
            f"(or the endpoint in MEDQ_LLM__ENDPOINTS) at the final address{kind}"
        )
    # llama-cpp-python's server refuses json_schema with a 500 (pydantic's error
    # about response_format), others with 400/422: the message decides, not the status.
    if status in (400, 422, 500) and "response_format" in lowered:
        return FormatRejected(f"{head}: the response_format was refused{kind}")
    # Before the "schema" test below: a note quoted in the message may say "schema".
    if status in (400, 413, 422) and _is_context_exceeded(doc, lowered):
        n = _context_size(doc, lowered)
        size = f"{n} tokens" if n else "size not given"
        return ContextExceeded(f"{head}: the prompt is longer than the server's context ({size}){kind}", context_tokens=n)
    if status == 429:
        return RateLimited(head + kind, retry_after_s=retry_after_s)
    if status == 503 or (status >= 500 and any(w in lowered for w in _BACKPRESSURE_WORDS)):
        return Overloaded(head + kind, retry_after_s=retry_after_s)
    if status == 504 or status == 408:
        return EndpointTimeout(head + kind, retry_after_s=retry_after_s)
    if status == 502:
        return EndpointUnavailable(head + kind, retry_after_s=retry_after_s)
    if status >= 500:
        return ServerError(head + kind, retry_after_s=retry_after_s)
    if status in (400, 422) and "schema" in lowered:
        return FormatRejected(f"{head}: the response_format was refused{kind}")
    if status == 404 and _is_model_not_found(lowered):
        return ModelNotFound(
            f"{head}: model {json.dumps(model)} not found{kind}; "
            "set MEDQ_LLM__MODEL, or the endpoint's model in MEDQ_LLM__ENDPOINTS"
        )
    return RequestRejected(head + kind)


# How servers say a prompt does not fit their context, in the lowered message:
# llama.cpp's server ("the request exceeds the available context size, try increasing it",
# newer: "request (9412 tokens) exceeds the available context size (8192 tokens)"),
# OpenAI, vLLM and llama-cpp-python ("This model's maximum context length is 2048 tokens.
# However, you requested ..."), older vLLM ("... is longer than the maximum model length of
# 2048"), vLLM V1 ("... too long to fit into the model (context length 2048)"), TGI
# ("`inputs` tokens + `max_new_tokens` must be <= 2048", "`inputs` must have less than 2048
# tokens"), llama-cpp-python's llama ("exceed context window of 2048").
_CONTEXT_WORDS = (
    "context length",
    "context window",
    "context size",
    "maximum model length",
    "`max_new_tokens` must be <=",
    "`inputs` must have less than",
)
# The server's own names for it: llama.cpp's error type, OpenAI's (and vLLM's) error code.
_CONTEXT_NAMES = ("exceed_context_size_error", "context_length_exceeded")
# Where a message names the context's size: the number after each of these.
_CONTEXT_SIZE_RE = re.compile(
    r"(?:maximum context length is|maximum model length of|context window of|"
    r"`max_new_tokens` must be <=|`inputs` must have less than|"
    r"context (?:length|window|size))[^0-9]{0,12}(\d{1,9})"
)


def _error_object(doc: Any) -> dict[str, Any]:
    """``{"error": {...}}``'s inner object (OpenAI, vLLM, llama.cpp), else the document."""
    if not isinstance(doc, dict):
        return {}
    err = doc.get("error")
    return err if isinstance(err, dict) else doc


def _is_context_exceeded(doc: Any, lowered: str) -> bool:
    err = _error_object(doc)
    named = {str(err.get(k)).lower() for k in ("type", "code") if isinstance(err.get(k), str)}
    return bool(named & set(_CONTEXT_NAMES)) or _positive_int(err.get("n_ctx")) is not None or any(
        w in lowered for w in _CONTEXT_WORDS
    )


def _context_size(doc: Any, lowered: str) -> int:
    """The context size the server named: llama.cpp's ``n_ctx``, else the number the
    message gives as the limit (not the prompt's size); 0 when it names none."""
    n_ctx = _positive_int(_error_object(doc).get("n_ctx"))
    if n_ctx is not None:
        return n_ctx
    found = _CONTEXT_SIZE_RE.search(lowered)
    return int(found.group(1)) if found and int(found.group(1)) > 0 else 0


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _is_model_not_found(lowered: str) -> bool:
    # Ollama: 'model "x" not found, try pulling it first'; vLLM and OpenAI: 'The model
    # `x` does not exist'. A 404 for the path (a base URL without /v1) is not one.
    return "model" in lowered and ("not found" in lowered or "does not exist" in lowered)


def _retry_after_s(headers: Any, now_s: float | None = None) -> float | None:
    """How long the server asks us to wait, from ``retry-after-ms`` (OpenAI's) or
    ``Retry-After`` in either of its forms (RFC 9110): seconds, or an HTTP-date.

    A date is counted from the answer's own ``Date`` header when it has one, so that
    a worker whose clock is off does not wait too long or not at all; else from
    ``now_s`` (the worker's clock). Never negative; None when absent or unreadable."""
    try:
        if "retry-after-ms" in headers:
            return _non_negative(float(headers["retry-after-ms"]) / 1000)
        if "retry-after" not in headers:
            return None
        value = str(headers["retry-after"]).strip()
    except (TypeError, ValueError):
        return None
    try:
        return _non_negative(float(value))
    except ValueError:
        pass
    retry_at = _http_date_s(value)
    if retry_at is None:
        return None
    server_now = _http_date_s(str(headers.get("date", "")))
    reference = server_now if server_now is not None else (time.time() if now_s is None else now_s)
    return max(retry_at - reference, 0.0)


def _non_negative(seconds: float) -> float | None:
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _http_date_s(value: str) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _parsed(body: Any) -> Any:
    """The body as JSON when it is JSON, else as text."""
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            return json.loads(body)
        except ValueError:
            return body
    return body


def _server_message(doc: Any) -> str:
    """The server's error text, to classify the error by; never shown."""
    msg: Any = None
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        msg = err.get("message") or err.get("detail") if isinstance(err, dict) else err
    if msg is None:
        msg = doc if doc is not None else ""
    text = msg if isinstance(msg, str) else json.dumps(msg, ensure_ascii=False, default=str)
    return " ".join(text.split())[:300]


def _in_kind(doc: Any, body: Any) -> str:
    """What the server said, without its words: ``type X, code Y, body sha256 <12 hex>``.

    ``type`` and ``code`` as OpenAI, vLLM and llama.cpp put them in ``{"error": {...}}``,
    TGI's ``error_type`` beside its ``error``; each only when it is a short name."""
    said: dict[str, str] = {}
    if isinstance(doc, dict):
        err = doc.get("error")
        for source in (err if isinstance(err, dict) else {}, doc):
            for key, label in (("type", "type"), ("code", "code"), ("error_type", "type")):
                value = source.get(key)
                named = isinstance(value, (str, int)) and not isinstance(value, bool) and _TOKEN.fullmatch(str(value))
                if named and label not in said:
                    said[label] = str(value)
    raw = _raw_bytes(body)
    digest = f"body sha256 {hashlib.sha256(raw).hexdigest()[:12]}" if raw else "empty body"
    return ", ".join([*(f"{k} {v}" for k, v in said.items()), digest])


def _raw_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body, ensure_ascii=False, default=str).encode()
