"""Does each endpoint serve the model medq asks it for? Checked when a worker starts
(``worker.celery_app``) and by ``medq endpoints``.

``GET {base}/models`` first: a model it lists is served. Not being listed does not make
the name wrong: llama-cpp-python's server lists its one model under its own name and
takes any name in a request. So one tiny chat completion (``max_tokens`` 1, a fixed
prompt, no record text) asks the server itself, and only its "model not found" answer
(Ollama's 404 for a model it has not pulled) says the name is wrong. Without that check
every job would fail as ``model_not_found``, one by one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any

from medq.core.errors import EndpointTimeout, EndpointUnavailable, MedqError, ModelNotFound
from medq.core.urls import redact_url
from worker.llm.client import LLMClient

# Short: a worker waits for this at start, and an endpoint that is down is only worth a warning.
CHECK_TIMEOUT_S = 5.0
PROBE_MESSAGES = [{"role": "user", "content": "Reply with the word OK."}]


class ModelStatus(str, Enum):
    OK = "ok"
    NOT_SERVED = "not_served"  # the server said it has no such model
    UNREACHABLE = "unreachable"  # no connection: it may come up later
    UNCONFIRMED = "unconfirmed"  # it answered, but neither listed the model nor took the probe


@dataclass(frozen=True)
class ModelCheck:
    url: str  # as shown: userinfo redacted
    model: str
    status: ModelStatus
    served: tuple[str, ...] = ()
    reason: str = ""  # why unreachable or unconfirmed (an error kind; never a server's text)
    setting: str = "MEDQ_LLM__MODEL"  # where this endpoint's model name comes from

    def summary(self) -> str:
        """``ok``, ``not served (serves: a, b)``, ``unreachable`` or ``unconfirmed (kind)``."""
        if self.status is ModelStatus.NOT_SERVED:
            return f"not served (serves: {', '.join(self.served) or 'none listed'})"
        if self.status is ModelStatus.UNCONFIRMED:
            return f"unconfirmed ({self.reason})"
        return str(self.status.value)

    def problem(self) -> str:
        """What is wrong and what to change, for a model that is not served."""
        serves = ", ".join(self.served) if self.served else "it lists none"
        return (
            f'{self.url} does not serve model "{self.model}" (it serves: {serves}); set {self.setting} '
            f"to a model it serves, or add the model to the server (Ollama: ollama pull {self.model})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.model, "status": self.status.value, "served": list(self.served), "reason": self.reason}


def check_model(url: str, api_key: str, model: str, timeout_s: float = CHECK_TIMEOUT_S,
                setting: str = "MEDQ_LLM__MODEL") -> ModelCheck:
    """Ask ``url`` whether it serves ``model``: its model list, then a one-token probe."""
    shown = redact_url(url)
    client = LLMClient(url, api_key, model, timeout_s)
    try:
        return _check(client, shown, model, setting)
    finally:
        client.close()


def _check(client: LLMClient, shown: str, model: str, setting: str) -> ModelCheck:
    try:
        served = _served(client.get_json("models"))
    except (EndpointUnavailable, EndpointTimeout) as exc:  # refused, DNS, or no answer in time
        return ModelCheck(shown, model, ModelStatus.UNREACHABLE, reason=exc.kind, setting=setting)
    except Exception:  # noqa: BLE001 - no list here (a 404, not JSON): the probe decides
        served = ()
    if model in served:
        return ModelCheck(shown, model, ModelStatus.OK, served, setting=setting)
    try:
        client.complete(PROBE_MESSAGES, response_format=None, max_tokens=1, temperature=0.0)
    except ModelNotFound:
        return ModelCheck(shown, model, ModelStatus.NOT_SERVED, served, setting=setting)
    except EndpointUnavailable:
        return ModelCheck(shown, model, ModelStatus.UNREACHABLE, served, "endpoint_unavailable", setting)
    except MedqError as exc:  # busy, loading the model, slow: the name may well be right
        return ModelCheck(shown, model, ModelStatus.UNCONFIRMED, served, exc.kind, setting)
    return ModelCheck(shown, model, ModelStatus.OK, served, setting=setting)


def _served(doc: Any) -> tuple[str, ...]:
    """The model ids of an OpenAI model list (``{"data": [{"id": ...}]}``); none from
    anything else (TGI's single object)."""
    data = doc.get("data") if isinstance(doc, dict) else None
    return tuple(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m) if isinstance(data, list) else ()


def check_models(settings: Any, timeout_s: float = CHECK_TIMEOUT_S) -> list[ModelCheck]:
    """:func:`check_model` for every configured endpoint, side by side, in their order."""
    llm = settings.llm

    def one(ep: Any) -> ModelCheck:
        key = (ep.api_key or llm.api_key).get_secret_value()
        setting = "the endpoint's model in MEDQ_LLM__ENDPOINTS" if ep.model else "MEDQ_LLM__MODEL"
        return check_model(ep.url, key, ep.model or llm.model, timeout_s, setting)

    endpoints = llm.all_endpoints
    with ThreadPoolExecutor(max_workers=max(1, min(len(endpoints), 8))) as pool:
        return list(pool.map(one, endpoints))
