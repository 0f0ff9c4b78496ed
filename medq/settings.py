"""Settings: environment (``MEDQ_``, nested with ``__``) over ``configs/medq.yaml``.

Loaded once per process with :func:`get_settings` and passed in; nothing else in
medq reads the environment. Secrets are ``SecretStr`` and never printed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = "configs/medq.yaml"


def _config_dir() -> Path:
    """``configs/`` of the current directory if it has one, else the one medq ships."""
    here = Path.cwd() / "configs"
    return here if (here / "medq.yaml").is_file() or (here / "schemas").is_dir() else REPO_ROOT / "configs"


ResponseFormat = Literal["auto", "json_schema", "json_object_schema", "json_object", "none"]


class LLMSettings(BaseModel):
    base_url: str = "http://127.0.0.1:8080/v1"
    model: str = "local"
    api_key: SecretStr = SecretStr("sk-local")
    # How to ask for schema-constrained output; "auto" probes json_schema first and
    # falls back per endpoint (llama-cpp-python's server only takes json_object+schema).
    response_format: ResponseFormat = "auto"
    timeout_s: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 1024
    max_tokens_cap: int = 4096  # truncated answers are re-asked with doubled max_tokens up to this
    reasks: int = 2  # extra calls that show the model its validation errors
    # "single": the whole schema in one call; "fields": one small call per field, merged.
    # Measure which suits your model (README, "Extraction quality").
    strategy: Literal["single", "fields"] = "single"
    few_shot: bool = True  # show the schema's examples as prior turns
    grounding: Literal["flag", "drop"] = "flag"  # values not found in the note: list them, or drop them
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    max_in_flight: int = 8
    allowed_hosts: list[str] = Field(default_factory=list)


class WorkerSettings(BaseModel):
    concurrency: int = 8
    pool: Literal["threads", "prefork", "solo"] = "threads"
    max_retries: int = 6  # transient endpoint errors per job
    retry_backoff_s: float = 2.0
    retry_backoff_max_s: float = 300.0
    task_time_limit_s: int = 900


class FlowerSettings(BaseModel):
    user: str | None = None
    password: SecretStr | None = None


class APISettings(BaseModel):
    tokens: SecretStr | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MEDQ_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    results_url: str | None = None  # default: the Redis URL; postgresql://... for durable results
    payload_ttl_s: int = 7 * 24 * 3600
    results_ttl_s: int = 30 * 24 * 3600
    max_record_bytes: int = 200_000
    schemas_dirs: str = ""  # colon-separated, searched after configs/schemas
    allow_remote_llm: bool = False
    encryption_key: SecretStr | None = None

    llm: LLMSettings = Field(default_factory=LLMSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    api: APISettings = Field(default_factory=APISettings)

    @field_validator("results_url")
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
        yaml_file = _config_dir() / "medq.yaml"
        return (
            init_settings,
            env_settings,
            YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file),
        )

    @property
    def effective_results_url(self) -> str:
        return self.results_url or self.redis_url

    @property
    def schema_dirs(self) -> list[Path]:
        dirs = [_config_dir() / "schemas"]
        dirs += [Path(p) for p in self.schemas_dirs.split(os.pathsep) if p]
        return dirs

    @property
    def visibility_timeout_s(self) -> int:
        """Longer than a task's time limit plus the longest retry delay, so a slow job
        is never handed to a second worker while the first still runs it."""
        return int(self.worker.task_time_limit_s + self.worker.retry_backoff_max_s + 600)


@functools.cache
def get_settings() -> Settings:
    return Settings()
