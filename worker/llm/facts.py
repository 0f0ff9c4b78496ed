"""What an endpoint says about its limits, learned once when a worker starts.

A worker that knows the context size splits a long note before sending it, instead of
learning it from a refusal (``ContextExceeded``) or, worse, from a prompt cut without a
word (Ollama). A server that says how many requests it works on at once (llama.cpp's
slots) tells the worker how many to send. Servers that say nothing are common
(llama-cpp-python's server, Ollama with its default context): then nothing is learned
here and the worker learns from the answers instead.

Probes, all GETs but one, none carrying record text:

1. ``GET {base}/models``: vLLM's ``max_model_len`` on the model's entry.
2. ``GET {root}/props`` (``root``: base without ``/v1``): llama.cpp's server,
   ``default_generation_settings.n_ctx`` (or a top-level ``n_ctx``) and ``total_slots``.
   Asked even when 1. gave the size: the slots are only said here.
3. Only when neither gave a size, Ollama: ``GET {root}/api/ps`` (a loaded model's
   ``context_length``), then, only when that answered as Ollama does, ``POST
   {root}/api/show`` (a ``num_ctx`` parameter): a POST goes to no other server.

The standard library's urllib is the client: this runs in every worker, whose install
need not have httpx. Redirects are not followed (the privacy guard approved this
endpoint, not wherever it points), proxies from the environment are not used (as the
worker engine's aiohttp session does not), and nothing here raises: an error, a
timeout or an answer that cannot be read means nothing learned from that probe.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medq.core.urls import split_credentials

# A /props or /api/show answer carries the chat template and the license: some KB. More
# than this is not an answer to these probes.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
# Ollama's /api/show "parameters" text: one "name value" per line, aligned with spaces.
_NUM_CTX_RE = re.compile(r"^\s*num_ctx\s+(\d{1,9})\s*$", re.MULTILINE)


@dataclass(frozen=True)
class EndpointFacts:
    context_tokens: int | None = None  # the context window, in tokens
    parallel: int | None = None  # requests the server works on at once (llama.cpp slots)
    source: str = ""  # where they came from: "props", "max_model_len", "ollama", "" (nothing said)

    def describe(self) -> str:
        """For logs: ``context 4096 tokens (props), 8 slots``, or ``nothing said``."""
        parts = []
        if self.context_tokens is not None:
            parts.append(f"context {self.context_tokens} tokens ({self.source})")
        elif self.source:
            parts.append(f"context not said ({self.source})")
        if self.parallel is not None:
            parts.append(f"{self.parallel} slot{'s' if self.parallel != 1 else ''}")
        return ", ".join(parts) or "nothing said"


class _Unreachable(Exception):
    """No connection, or no answer in time: the other probes go to the same server."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises HTTPError for the 3xx: nothing learned


_OPENER = urllib.request.build_opener(_NoRedirect(), urllib.request.ProxyHandler({}))


def learn_endpoint(url: str, api_key: str, model: str, timeout_s: float = 5.0) -> EndpointFacts:
    """What the endpoint at ``url`` (its ``/v1`` base) says of its context and slots.

    Never raises. ``timeout_s`` bounds the whole, not each probe: a worker waits for this
    at start. When the server stops answering (no connection, no time left) the later
    probes are not sent, and what the earlier ones said is kept."""
    bare, basic = split_credentials(url)
    base = bare.rstrip("/")
    headers = {"Accept": "application/json"}
    if basic or api_key:
        headers["Authorization"] = basic or f"Bearer {api_key}"
    deadline = time.monotonic() + timeout_s
    learned = _Learned()
    try:
        _probe(base, model, lambda target, body=None: _fetch(target, headers, body, deadline), learned)
    except _Unreachable:
        pass
    return learned.facts()


@dataclass
class _Learned:
    context_tokens: int | None = None
    parallel: int | None = None
    source: str = ""
    ollama: bool = False  # /api/ps or /api/show answered as Ollama does

    def facts(self) -> EndpointFacts:
        if self.context_tokens is not None:
            return EndpointFacts(self.context_tokens, self.parallel, self.source)
        source = "ollama" if self.ollama else "props" if self.parallel is not None else ""
        return EndpointFacts(None, self.parallel, source)


def _probe(base: str, model: str, get: Callable[..., Any], learned: _Learned) -> None:
    """The probes in order, into ``learned``; raises _Unreachable when the server stops answering."""
    root = base.removesuffix("/v1")
    context = _from_models(get(f"{base}/models"), model)
    if context is not None:
        learned.context_tokens, learned.source = context, "max_model_len"
    context, learned.parallel = _from_props(get(f"{root}/props"))
    if learned.context_tokens is None and context is not None:
        learned.context_tokens, learned.source = context, "props"
    if learned.context_tokens is not None:
        return
    learned.ollama, context = _from_ollama_ps(get(f"{root}/api/ps"), model)
    if context is None and learned.ollama:
        shown, context = _from_ollama_show(get(f"{root}/api/show", {"model": model}))
        learned.ollama = learned.ollama or shown
    if context is not None:
        learned.context_tokens, learned.source = context, "ollama"


def _fetch(target: str, headers: dict[str, str], body: dict[str, Any] | None, deadline: float) -> Any:
    """The JSON a probe got, or None (an HTTP error, a redirect, not JSON, too long).
    Raises _Unreachable when there is no connection or no time left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Unreachable
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers = {**headers, "Content-Type": "application/json"}
    request = urllib.request.Request(target, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with _OPENER.open(request, timeout=left) as resp:
            raw = resp.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:  # a status >= 300 (redirects included): it answered
        exc.close()
        return None
    except (urllib.error.URLError, OSError) as exc:  # refused, DNS, timeout, reset
        raise _Unreachable from exc
    except Exception:  # noqa: BLE001 - a malformed answer (http.client's own errors): nothing learned
        return None
    if len(raw) > MAX_ANSWER_BYTES:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _count(value: Any) -> int | None:
    """A positive integer, else None (JSON's true is not a count)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _from_models(doc: Any, model: str) -> int | None:
    """vLLM's ``max_model_len`` on the model's entry in ``/v1/models`` (the only entry
    when none has the model's id)."""
    data = doc.get("data") if isinstance(doc, dict) else None
    entries = [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []
    chosen = [e for e in entries if e.get("id") == model] or (entries if len(entries) == 1 else [])
    return _count(chosen[0].get("max_model_len")) if chosen else None


def _from_props(doc: Any) -> tuple[int | None, int | None]:
    """llama.cpp's ``/props``: (context, slots). ``default_generation_settings.n_ctx`` is
    already one slot's context (llama.cpp splits ``--ctx-size`` between ``--parallel``
    slots and reports a slot's share), which is what one request gets: used as it is."""
    if not isinstance(doc, dict):
        return None, None
    settings = doc.get("default_generation_settings")
    n_ctx = _count(settings.get("n_ctx")) if isinstance(settings, dict) else None
    if n_ctx is None:
        n_ctx = _count(doc.get("n_ctx"))  # where some builds put it
    return n_ctx, _count(doc.get("total_slots"))


def _is_model(entry: dict[str, Any], model: str) -> bool:
    # Ollama names "qwen2.5" as "qwen2.5:latest" in its lists.
    names = {entry.get("name"), entry.get("model")}
    return model in names or (":" not in model and f"{model}:latest" in names)


def _from_ollama_ps(doc: Any, model: str) -> tuple[bool, int | None]:
    """Ollama's ``/api/ps``: (it is Ollama, the loaded model's ``context_length``).
    A model not loaded is not listed: then ``/api/show`` is asked."""
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list):
        return False, None
    for entry in models:
        if isinstance(entry, dict) and _is_model(entry, model):
            return True, _count(entry.get("context_length"))
    return True, None


def _from_ollama_show(doc: Any) -> tuple[bool, int | None]:
    """Ollama's ``/api/show``: (it is Ollama, the ``num_ctx`` the model is set to run with).

    Not ``model_info["<arch>.context_length"]``: that is what the model was trained for,
    not what Ollama runs it with (its own default, 4096 now, unless ``num_ctx`` or
    ``OLLAMA_CONTEXT_LENGTH`` says otherwise). Without ``num_ctx`` the size is not
    known here; the worker learns it when Ollama cuts a prompt."""
    if not isinstance(doc, dict) or not any(k in doc for k in ("parameters", "model_info", "modelfile")):
        return False, None
    params = doc.get("parameters")
    found = _NUM_CTX_RE.search(params) if isinstance(params, str) else None
    return True, (_count(int(found.group(1))) if found else None)
