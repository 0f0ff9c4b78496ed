"""Settings: environment (``MEDQ_``, nested with ``__``) over ``configs/medq.yaml``.

Loaded once per process with :func:`get_settings` and passed in; nothing else in
medq reads the environment. Secrets are ``SecretStr`` and never printed.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = "configs/medq.yaml"


def _config_file() -> Path:
    """``configs/medq.yaml`` of the current directory if there is one, else the one medq ships."""
    here = Path.cwd() / CONFIG_FILE
    return here if here.is_file() else REPO_ROOT / CONFIG_FILE


ResponseFormat = Literal["auto", "json_schema", "json_object_schema", "tgi", "json_object", "none"]


class EndpointSettings(BaseModel):
    """One OpenAI-compatible server. ``model`` / ``api_key`` default to the ``llm`` ones."""

    url: str
    weight: float = Field(default=1.0, gt=0)
    model: str | None = None
    api_key: SecretStr | None = None
    context_tokens: int | None = Field(default=None, gt=0)  # default: the llm one, else learned


def _endpoint_list(value: Any) -> Any:
    """``MEDQ_LLM__ENDPOINTS``: a JSON list (of URLs or ``{"url", "weight", "model"}``),
    or plain comma-separated URLs, each optionally ``URL*WEIGHT``."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, str):
                url, _, weight = item.partition("*")
                item = {"url": url.strip(), **({"weight": weight.strip()} if weight else {})}
            out.append(item)
        return out
    return value


class LLMSettings(BaseModel):
    base_url: str = "http://127.0.0.1:8080/v1"
    model: str = "local"
    api_key: SecretStr = SecretStr("sk-local")
    # How to ask for schema-constrained output; "auto" probes json_schema first and
    # falls back per endpoint (llama-cpp-python's server only takes json_object+schema,
    # TGI only {"type": "json", "value": schema}); order in worker.llm.client.RESPONSE_FORMATS.
    response_format: ResponseFormat = "auto"
    # The least a model call is given; a slow endpoint gets more, from its measured speed
    # (3x the time a whole answer takes there), up to timeout_max_s.
    timeout_s: float = 120.0
    timeout_max_s: float = 900.0
    # The endpoint's context window in tokens. Default: learned from the server (llama.cpp
    # /props, vLLM max_model_len, Ollama num_ctx), or from its refusal or cut of a longer
    # prompt. A note that does not fit with the prompt and the answer is sent in pieces.
    context_tokens: int | None = Field(default=None, gt=0)
    temperature: float = 0.0
    max_tokens: int = 1024
    max_tokens_cap: int = 4096  # truncated answers are re-asked with doubled max_tokens up to this
    reasks: int = 2  # extra calls that show the model its validation errors
    # "single": the whole schema in one call; "fields": one small call per field, merged.
    # Measure which suits your model (README, "Extraction quality").
    strategy: Literal["single", "fields"] = "single"
    few_shot: bool = True  # show the schema's examples as prior turns
    # strategy single: the JSON Schema in the system prompt too, besides the field list
    # (false: about 300 tokens shorter; the server's response_format still enforces it)
    schema_in_prompt: bool = True
    grounding: Literal["flag", "drop"] = "flag"  # values not found in the note: list them, or drop them
    # More than one server: requests spread by weight over the healthy ones, and a job
    # fails over to another. Empty: just base_url.
    endpoints: Annotated[list[EndpointSettings], NoDecode] = Field(default_factory=list)
    # Limits per endpoint, shared by every worker on every host (kept in Redis).
    requests_per_min: int | None = None
    tokens_per_min: int | None = None  # a request counts prompt estimate + max_tokens, settled after
    max_in_flight: int = 8  # the ceiling of the adaptive cap
    min_in_flight: int = 1
    adaptive: bool = True  # shrink the in-flight cap on 429/503/timeouts, grow it back on success
    max_wait_s: float = 5.0  # how long one call waits for capacity before its job is put back
    failure_threshold: int = 3  # consecutive endpoint failures before it is cooled down
    cooldown_s: float = 2.0  # first cool-down; doubles while probes keep failing
    cooldown_max_s: float = 60.0
    allowed_hosts: list[str] = Field(default_factory=list)

    _split_endpoints = field_validator("endpoints", mode="before")(_endpoint_list)

    @property
    def all_endpoints(self) -> list[EndpointSettings]:
        return self.endpoints or [EndpointSettings(url=self.base_url)]


class WorkerSettings(BaseModel):
    concurrency: int = 8
    pool: Literal["threads", "prefork", "solo"] = "threads"
    max_retries: int = 6  # charged errors per job (timeouts, 5xx); back-pressure is not counted
    max_wait_s: float = 6 * 3600  # back-pressure (busy, down, rate-limited) delays a job this long at most
    # A results store away: a finished job holds its answer and writes it again this long at
    # most (its lease kept), then fails as store_unavailable (plain `medq requeue` takes it).
    store_wait_s: float = 600.0
    retry_backoff_s: float = 2.0
    retry_backoff_max_s: float = 300.0
    task_time_limit_s: int = 900
    # A running job holds a lease that its worker renews; a job found running with an
    # expired lease lost its worker. After this many lost runs it is a poison job.
    lease_s: float = 30.0
    max_lost_runs: int = 3
    visibility_timeout_s: int | None = None  # default: derived (see Settings.visibility_timeout_s)


class FlowerSettings(BaseModel):
    user: str | None = None
    password: SecretStr | None = None


class APISettings(BaseModel):
    # ``medq api``'s bearer tokens: CLIENT:TOKEN pairs (or bare tokens), comma-separated.
    # A batch belongs to the client that created it.
    tokens: SecretStr | None = None
    max_batch_bytes: int = Field(default=256 * 2**20, gt=0)  # one POST /v1/batches body
    # Records in one POST /v1/batches: the service keeps each one's id while the body
    # arrives, so this bounds its memory (about 150 bytes a record).
    max_batch_records: int = Field(default=100_000, gt=0)
    # Slow clients (slowloris): uvicorn waits for a request's headers and body for ever.
    # A client gets this long for its headers (then the connection is closed) and for its
    # whole body, counted from its headers (then 408 and closed); at most this many
    # connections at once (more get 503).
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=300.0, gt=0)
    max_connections: int = Field(default=256, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MEDQ_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Where task messages go. Default: the Redis URL; amqp://... for RabbitMQ (job state,
    # limits and Celery's results stay in Redis).
    broker_url: str | None = None
    results_url: str | None = None  # default: the Redis URL; postgresql://... for durable results
    payload_ttl_s: int = 7 * 24 * 3600
    results_ttl_s: int = 30 * 24 * 3600
    max_record_bytes: int = 200_000
    # A record's id and metadata are copied into its job state and every result export.
    max_id_chars: int = Field(default=256, gt=0)
    max_metadata_bytes: int = Field(default=64 * 1024, gt=0)  # as compact UTF-8 JSON
    # Jobs per task message the producer sends; a worker runs them side by side. One
    # message per job costs more worker CPU than the job itself at a fast endpoint.
    jobs_per_message: int = 16
    schemas_dirs: str = ""  # colon-separated, searched after configs/schemas
    allow_remote_llm: bool = False
    encryption_key: SecretStr | None = None

    llm: LLMSettings = Field(default_factory=LLMSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    api: APISettings = Field(default_factory=APISettings)

    @field_validator("results_url", "broker_url")
    @classmethod
    def _blank_is_none(cls, v: str | None) -> str | None:
        return v or None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _config_file()
        return (
            init_settings,
            env_settings,
            YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file),
        )

    @property
    def effective_results_url(self) -> str:
        return self.results_url or self.redis_url

    @property
    def effective_broker_url(self) -> str:
        """The broker every Celery app of medq (worker, producer, Flower) connects to."""
        return self.broker_url or self.redis_url

    @property
    def broker_is_amqp(self) -> bool:
        """RabbitMQ (``amqp://``, ``amqps://``, ``pyamqp://``) rather than Redis."""
        return self.effective_broker_url.split("://", 1)[0].lower() in ("amqp", "amqps", "pyamqp")

    @property
    def schema_dirs(self) -> list[Path]:
        """The bundled schemas, then ``configs/schemas`` of the current directory, then
        ``MEDQ_SCHEMAS_DIRS``; a later folder overrides an earlier one's schema of the same
        name and version. A ``configs/medq.yaml`` of the user's never hides the bundled ones."""
        dirs = [REPO_ROOT / "configs" / "schemas"]
        here = Path.cwd() / "configs" / "schemas"
        if here.is_dir() and here.resolve() != dirs[0].resolve():
            dirs.append(here)
        dirs += [Path(p) for p in self.schemas_dirs.split(os.pathsep) if p]
        return dirs

    @property
    def visibility_timeout_s(self) -> int:
        """How long Redis keeps a delivered, unacknowledged message before handing it to
        another worker. That is also how long a job whose worker was killed waits before
        it runs again. Default: longer than a task's time limit plus the longest retry
        delay, so a slow job is rarely handed out twice (the job lease keeps the second
        delivery from running it while the first still does)."""
        if self.worker.visibility_timeout_s:
            return self.worker.visibility_timeout_s
        return int(self.worker.task_time_limit_s + self.worker.retry_backoff_max_s + 600)

    @property
    def broker_transport_options(self) -> dict[str, Any]:
        """kombu's transport options. RabbitMQ: publisher confirms, so a message counts as
        sent (and its job as sent) only once the broker has it on disk (a quorum queue
        confirms once a majority of its replicas has it); it redelivers an unacknowledged
        message as soon as its consumer's connection is gone, so it has no visibility
        timeout. Redis: the visibility timeout, and a sweep for expired messages every
        quarter of it (kombu's default sweep is every ~100 s, however short the timeout)."""
        if self.broker_is_amqp:
            return {"confirm_publish": True}
        vt = self.visibility_timeout_s
        return {
            "visibility_timeout": vt,
            "unacked_restore_interval": max(1, min(10, vt // 4)),
            "unacked_restore_throttle": 1,
        }

    @property
    def max_countdown_s(self) -> float:
        """A delayed message waits in its worker, unacknowledged: it must come back well
        within the visibility timeout, or Redis hands out a second copy."""
        return min(self.worker.retry_backoff_max_s, self.visibility_timeout_s / 2)


@functools.cache
def get_settings() -> Settings:
    return Settings()
