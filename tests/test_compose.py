"""The Docker deployment files, checked without a Docker engine.

Two kinds of tests:

* the compose CLI (`docker-compose` 1.29 or `docker compose` v2, whichever is on
  PATH; both if both are) renders the file with `config`, which needs no daemon:
  it must parse, interpolate the passwords where they belong and refuse to run
  without them;
* the YAML, Dockerfile and .dockerignore themselves, read with PyYAML: what makes
  the stack scalable and what keeps it private.

Nothing here needs Redis; no fixture from conftest.py is used.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e  # docker-compose and the image are checked with their own binaries

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

CORE_SERVICES = {"redis", "ollama", "worker", "flower", "metrics"}
REQUIRED_ENV = {
    "REDIS_PASSWORD": "s3cretredis",
    "MEDQ_FLOWER__USER": "admin",
    "MEDQ_FLOWER__PASSWORD": "s3cretflower",
}
# Anything from the caller's shell that would change what compose renders.
_CLEARED_ENV = (
    *REQUIRED_ENV,
    "POSTGRES_PASSWORD",
    "OLLAMA_MODEL",
    "OLLAMA_NUM_PARALLEL",
    "OLLAMA_CONTEXT_LENGTH",
    "MEDQ_RESULTS_URL",
    "MEDQ_ENCRYPTION_KEY",
    "MEDQ_IMAGE",
    "MEDQ_API__TOKENS",
    "MEDQ_BROKER_URL",
    "RABBITMQ_PASSWORD",
    "COMPOSE_FILE",
    "COMPOSE_PROFILES",
    "COMPOSE_PROJECT_NAME",
    "COMPOSE_ENV_FILES",
)


# --------------------------------------------------------------------------- helpers


def _compose_binaries() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    legacy = shutil.which("docker-compose")
    if legacy:
        found.append(("docker-compose", [legacy]))
    docker = shutil.which("docker")
    if docker:
        try:
            probe = subprocess.run(
                [docker, "compose", "version"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            probe = None
        if probe is not None and probe.returncode == 0:
            found.append(("docker compose", [docker, "compose"]))
    return found


_BINARIES = _compose_binaries()
_NO_BINARY = (
    "no compose binary on PATH (neither `docker-compose` nor `docker compose`); "
    "install one, e.g. `apt-get install docker-compose`, to check docker-compose.yml with the CLI"
)


@pytest.fixture(
    params=[pytest.param(cmd, id=name) for name, cmd in _BINARIES]
    or [pytest.param(None, id="no-compose", marks=pytest.mark.skip(reason=_NO_BINARY))]
)
def compose(request: pytest.FixtureRequest, tmp_path: Path):
    """A function running `<compose> ... config` in a controlled environment.

    An empty --env-file keeps a developer's own `.env` from filling in the
    variables these tests leave out on purpose.
    """
    base: list[str] = request.param
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")

    def run(env: dict[str, str], *, profiles: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
        full_env.update(env)
        args = [
            *base,
            "-f",
            str(COMPOSE_FILE),
            "--project-directory",
            str(REPO),
            "--env-file",
            str(empty_env_file),
        ]
        for profile in profiles:
            args += ["--profile", profile]
        args.append("config")
        return subprocess.run(args, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=120)

    return run


def _rendered(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, f"compose config failed:\n{proc.stderr}\n{proc.stdout}"
    data = yaml.safe_load(proc.stdout)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), proc.stdout
    return data


def _active_services(data: dict, profiles: tuple[str, ...] = ()) -> set[str]:
    """Services `up` would start. docker compose v2 already drops inactive profiles
    from `config`; docker-compose 1.29 prints every service with its `profiles`, so
    apply the rule (no profiles, or one of them enabled) here for both."""
    return {
        name
        for name, svc in data["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }


def _env(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {k: v for k, _, v in (item.partition("=") for item in env)}
    return dict(env)


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Just enough of compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` for the
    static tests (the CLI tests check the real thing)."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(name)
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value)


@pytest.fixture(scope="module")
def spec() -> dict:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


# ------------------------------------------------------------------ compose CLI tests


def test_config_parses_with_the_required_variables(compose) -> None:
    data = _rendered(compose(REQUIRED_ENV))
    assert CORE_SERVICES <= set(data["services"])
    assert _active_services(data) == CORE_SERVICES


def test_postgres_only_with_its_profile(compose) -> None:
    without = _rendered(compose(REQUIRED_ENV))
    assert "postgres" not in _active_services(without)

    with_profile = _rendered(compose({**REQUIRED_ENV, "POSTGRES_PASSWORD": "pgpw"}, profiles=("postgres",)))
    assert _active_services(with_profile, ("postgres",)) == CORE_SERVICES | {"postgres"}
    assert _env(with_profile["services"]["postgres"])["POSTGRES_PASSWORD"] == "pgpw"


def test_api_only_with_its_profile_and_gets_the_tokens(compose) -> None:
    without = _rendered(compose(REQUIRED_ENV))
    assert "api" not in _active_services(without)

    data = _rendered(compose({**REQUIRED_ENV, "MEDQ_API__TOKENS": "ward-a:0123456789abcdef0123"}, profiles=("api",)))
    assert _active_services(data, ("api",)) == CORE_SERVICES | {"api"}
    env = _env(data["services"]["api"])
    assert env["MEDQ_API__TOKENS"] == "ward-a:0123456789abcdef0123"
    assert env["MEDQ_REDIS_URL"] == "redis://:s3cretredis@redis:6379/0"


def test_rabbitmq_only_with_its_profile_and_its_url_reaches_the_broker_users(compose) -> None:
    without = _rendered(compose(REQUIRED_ENV))
    assert "rabbitmq" not in _active_services(without)
    assert not _env(without["services"]["worker"])["MEDQ_BROKER_URL"]  # empty: the broker is Redis

    url = "amqp://medq:rabbitpw@rabbitmq:5672/medq"
    data = _rendered(compose({**REQUIRED_ENV, "RABBITMQ_PASSWORD": "rabbitpw", "MEDQ_BROKER_URL": url},
                             profiles=("rabbitmq", "api")))
    assert _active_services(data, ("rabbitmq", "api")) == CORE_SERVICES | {"rabbitmq", "api"}
    assert _env(data["services"]["rabbitmq"])["RABBITMQ_DEFAULT_PASS"] == "rabbitpw"
    for name in ("worker", "flower", "api"):  # everyone who sends or takes task messages
        assert _env(data["services"][name])["MEDQ_BROKER_URL"] == url, name


def test_config_without_redis_password_fails_naming_it(compose) -> None:
    env = {k: v for k, v in REQUIRED_ENV.items() if k != "REDIS_PASSWORD"}
    proc = compose(env)
    assert proc.returncode != 0, proc.stdout
    assert "REDIS_PASSWORD" in proc.stderr + proc.stdout


@pytest.mark.parametrize("missing", ["MEDQ_FLOWER__USER", "MEDQ_FLOWER__PASSWORD"])
def test_config_without_flower_credentials_fails_naming_them(compose, missing: str) -> None:
    env = {k: v for k, v in REQUIRED_ENV.items() if k != missing}
    proc = compose(env)
    assert proc.returncode != 0, proc.stdout
    assert missing in proc.stderr + proc.stdout


def test_passwords_and_model_reach_both_sides(compose) -> None:
    data = _rendered(compose({**REQUIRED_ENV, "OLLAMA_MODEL": "llama3.2:1b"}))
    services = data["services"]

    redis_cmd = services["redis"]["command"]
    redis_cmd = redis_cmd if isinstance(redis_cmd, list) else redis_cmd.split()
    assert redis_cmd[redis_cmd.index("--requirepass") + 1] == "s3cretredis"

    worker_env = _env(services["worker"])
    assert worker_env["MEDQ_REDIS_URL"] == "redis://:s3cretredis@redis:6379/0"
    assert worker_env["MEDQ_LLM__MODEL"] == "llama3.2:1b"
    assert _env(services["ollama"])["OLLAMA_MODEL"] == "llama3.2:1b"
    assert _env(services["flower"])["MEDQ_REDIS_URL"] == "redis://:s3cretredis@redis:6379/0"
    assert not worker_env["MEDQ_RESULTS_URL"]  # empty: results stay in Redis


# ------------------------------------------------------------------ static YAML tests


def test_compose_specification_without_version_key(spec: dict) -> None:
    # docker-compose 1.29 accepts the Compose Specification without `version:`,
    # and docker compose v2 warns that the key is obsolete.
    assert "version" not in spec
    assert set(spec["services"]) == CORE_SERVICES | {"postgres", "api", "rabbitmq"}


def test_images(spec: dict) -> None:
    services = spec["services"]
    assert services["redis"]["image"] == "redis:7-alpine"
    assert services["ollama"]["image"].split(":")[0] == "ollama/ollama"
    assert services["postgres"]["image"] == "postgres:16-alpine"
    # worker and flower run the project's own image, built from this repository
    for name in ("worker", "flower"):
        build = services[name]["build"]
        assert (build if isinstance(build, str) else build.get("context", ".")) == "."
    assert services["worker"]["image"] == services["flower"]["image"]


def test_worker_is_scalable(spec: dict) -> None:
    worker = spec["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker["command"].split() == ["medq", "worker"]


def test_worker_environment_uses_the_contract_settings(spec: dict) -> None:
    env = _env(spec["services"]["worker"])
    assert env["MEDQ_LLM__BASE_URL"] == "http://ollama:11434/v1"
    assert env["MEDQ_LLM__API_KEY"] == "ollama"
    assert "${REDIS_PASSWORD" in env["MEDQ_REDIS_URL"] and "@redis:6379/0" in env["MEDQ_REDIS_URL"]
    assert "${OLLAMA_MODEL:-qwen2.5:1.5b}" == env["MEDQ_LLM__MODEL"]
    assert "${MEDQ_RESULTS_URL:-}" == env["MEDQ_RESULTS_URL"]
    depends = spec["services"]["worker"]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert "ollama" in depends


def test_worker_environment_is_understood_by_medq_settings(spec: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The names in the compose file are the ones medq reads (a typo such as
    MEDQ_LLM_BASE_URL would silently leave the worker on its defaults)."""
    from medq.core.settings import Settings

    for key in list(os.environ):
        if key.startswith("MEDQ_"):
            monkeypatch.delenv(key)
    shell = {"REDIS_PASSWORD": "pw"}
    for key, value in _env(spec["services"]["worker"]).items():
        if value is not None:  # `KEY:` with no value is a pass-through, unset here
            monkeypatch.setenv(key, _interpolate(str(value), shell))

    settings = Settings()
    assert settings.redis_url == "redis://:pw@redis:6379/0"
    assert settings.results_url is None
    assert settings.effective_results_url == settings.redis_url
    assert settings.effective_broker_url == settings.redis_url and not settings.broker_is_amqp
    assert settings.llm.base_url == "http://ollama:11434/v1"
    assert settings.llm.model == "qwen2.5:1.5b"
    assert settings.llm.api_key.get_secret_value() == "ollama"
    assert settings.llm.allowed_hosts == ["ollama"]


def test_redis_requires_a_password_and_persists(spec: dict) -> None:
    redis = spec["services"]["redis"]
    cmd = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    assert "--requirepass" in cmd
    assert cmd[cmd.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[0] in spec["volumes"] for v in redis["volumes"])
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "-a" in test and "ping" in test


def _host_ip(port: str | dict) -> str | None:
    if isinstance(port, dict):
        return port.get("host_ip")
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else None


def test_flower_binds_loopback_and_requires_credentials(spec: dict) -> None:
    flower = spec["services"]["flower"]
    assert flower["ports"], "flower should be reachable on the host"
    assert all(_host_ip(p) == "127.0.0.1" for p in flower["ports"])
    # medq flower: the same settings as `medq flower` on a host, login required
    assert flower["command"].split()[:2] == ["medq", "flower"]
    env = _env(flower)
    assert env["MEDQ_FLOWER__USER"].startswith("${MEDQ_FLOWER__USER:?")
    assert env["MEDQ_FLOWER__PASSWORD"].startswith("${MEDQ_FLOWER__PASSWORD:?")
    assert "FLOWER_BASIC_AUTH" not in env  # built by medq flower; the password is written once


def test_api_binds_loopback_runs_medq_api_and_checks_its_health(spec: dict) -> None:
    api = spec["services"]["api"]
    assert api["profiles"] == ["api"]
    assert api["command"].split()[:2] == ["medq", "api"]
    assert [_host_ip(p) for p in api["ports"]] == ["127.0.0.1"]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["image"] == spec["services"]["worker"]["image"]
    env = _env(api)
    # Records are sealed and results read with the workers' key and store.
    assert {"MEDQ_API__TOKENS", "MEDQ_ENCRYPTION_KEY", "MEDQ_RESULTS_URL"} <= set(env)


def test_nothing_is_published_beyond_loopback(spec: dict) -> None:
    for name, svc in spec["services"].items():
        for port in svc.get("ports", []):
            assert _host_ip(port) == "127.0.0.1", f"{name} publishes {port} on all interfaces"


def test_ollama_pulls_its_model_and_has_a_healthcheck(spec: dict) -> None:
    ollama = spec["services"]["ollama"]
    script = " ".join(ollama["entrypoint"])
    assert "ollama serve" in script and "ollama pull" in script
    env = _env(ollama)
    assert env["OLLAMA_MODEL"] == "${OLLAMA_MODEL:-qwen2.5:1.5b}"
    assert env["OLLAMA_NUM_PARALLEL"] == "${OLLAMA_NUM_PARALLEL:-8}"
    assert ollama["healthcheck"]["test"]
    assert any(v.split(":")[0] in spec["volumes"] for v in ollama["volumes"])


def test_ollama_context_holds_medqs_prompt_and_answer(spec: dict) -> None:
    # Ollama's default context cuts a long prompt silently; medq's fixed prompt is ~1,000
    # tokens and 1,024 are kept for the answer, so a note needs several thousand more.
    env = _env(spec["services"]["ollama"])
    assert "OLLAMA_CONTEXT_LENGTH" in env, "the ollama service must set OLLAMA_CONTEXT_LENGTH"
    assert int(_interpolate(str(env["OLLAMA_CONTEXT_LENGTH"]), {})) >= 8192
    assert int(_interpolate(str(env["OLLAMA_CONTEXT_LENGTH"]), {"OLLAMA_CONTEXT_LENGTH": "16384"})) == 16384


def test_postgres_is_optional(spec: dict) -> None:
    pg = spec["services"]["postgres"]
    assert pg["profiles"] == ["postgres"]
    assert "POSTGRES_PASSWORD" in _env(pg)
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.split(":")[0] in spec["volumes"] for v in pg["volumes"])


def test_rabbitmq_is_optional_and_keeps_its_queues(spec: dict) -> None:
    rabbit = spec["services"]["rabbitmq"]
    assert rabbit["profiles"] == ["rabbitmq"]
    assert rabbit["image"].split(":")[0] == "rabbitmq"
    # Its data lives under rabbit@<hostname>: a random container hostname would start
    # a recreated container on an empty node.
    assert rabbit["hostname"] == "rabbitmq"
    assert any(v.split(":")[0] in spec["volumes"] and v.endswith(":/var/lib/rabbitmq") for v in rabbit["volumes"])
    env = _env(rabbit)
    assert env["RABBITMQ_DEFAULT_USER"] == "medq" and "RABBITMQ_PASSWORD" in env["RABBITMQ_DEFAULT_PASS"]
    assert "rabbitmq-diagnostics" in " ".join(rabbit["healthcheck"]["test"])
    assert all(str(p).split(":")[-1] != "5672" for p in rabbit.get("ports", []))  # AMQP stays on the compose network
    # Optional, so nothing may wait for it (compose would refuse to start without the profile).
    assert all("rabbitmq" not in (svc.get("depends_on") or {}) for svc in spec["services"].values())
    for name in ("worker", "flower", "api"):
        assert _env(spec["services"][name])["MEDQ_BROKER_URL"] == "${MEDQ_BROKER_URL:-}", name


def test_usage_comment(spec: dict) -> None:
    text = COMPOSE_FILE.read_text()
    assert "docker compose up -d --scale worker=3" in text
    assert "--profile postgres" in text
    assert "MEDQ_RESULTS_URL=postgresql://medq:${POSTGRES_PASSWORD}@postgres:5432/medq" in text
    assert "--profile rabbitmq" in text
    assert "MEDQ_BROKER_URL=amqp://medq:${RABBITMQ_PASSWORD}@rabbitmq:5672/medq" in text


# ------------------------------------------------------------- Dockerfile and context


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instr = _instructions()
    assert instr[0] == ("FROM", "python:3.11-slim")
    assert ("WORKDIR", "/app") in instr
    assert any(k == "RUN" and "pip install --no-cache-dir -e ." in v for k, v in instr)
    users = [v for k, v in instr if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    cmd = [v for k, v in instr if k == "CMD"][-1]
    assert cmd.replace(" ", "") in ('["medq","worker"]', "medqworker")


def test_dockerignore_keeps_secrets_and_venv_out() -> None:
    entries = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()}
    assert {".git", ".venv", ".env"} <= entries
