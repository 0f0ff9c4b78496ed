"""The LLM simulator: schema-valid answers, faults, scripted outcomes, stats, its CLI.

Server tests talk real HTTP to the simulator's app served by uvicorn in a thread, one
per configuration for the module (``ThreadSimulator``: the command's own option parsing
and app); one test runs ``medq llm simulate`` as a process and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from medq.core.schemas import SchemaLoader
from medq.tools.simulator import FAULT_KINDS, SimConfig, draw_outcome, generate, parse_faults
from tests.helpers import MEDQ, Proc, ThreadSimulator, free_port, run_cli, wait_http

NOTE = (
    "72-year-old man seen in clinic. Former smoker, quit 2010. History of type 2 diabetes "
    "and hypertension. Takes metformin 500 mg twice daily. Allergic to penicillin."
)
# About 1,000 tokens of history first, the age at the end.
LONG_NOTE = "Seen in clinic for a routine review. " * 110 + "She is a 72-year-old woman."

SERVER_FLAGS: dict[str, list[str]] = {
    "plain": [],
    "no-stream": ["--no-stream"],
    "slow": ["--latency-ms", "1500", "--parallel", "1"],
    "reject": ["--reject-json-schema"],
    "parallel": ["--parallel", "2", "--latency-ms", "300"],
    "served": ["--served-model", "qwen2.5:1.5b", "--served-model", "llama3.2:1b,gemma3:1b"],
    "context": ["--context-tokens", "100"],
    "refuse": ["--context-tokens", "100", "--context-overflow", "refuse"],
    "advertise": ["--context-tokens", "3000", "--advertise-context", "--parallel", "3"],
    "advertise-slots": ["--advertise-context", "--parallel", "5"],
    **{f"fault-{kind}": ["--fault", f"{kind}:1", "--seed", "1"] for kind in FAULT_KINDS},
}

Schemas = dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def schemas() -> Schemas:
    loader = SchemaLoader()
    return {name: loader.get(name).json_schema for name in ("clinical_note", "discharge_summary")}


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, str]]:
    """Base URLs (…/v1) of every simulator configuration in SERVER_FLAGS, each served in a
    thread of this process from the options as the command parses them (``ThreadSimulator``);
    the command itself as a process: ``test_the_command_serves_and_stops_on_sigterm``."""
    started = {name: ThreadSimulator(*flags) for name, flags in SERVER_FLAGS.items()}
    try:
        yield {name: sim.base_url for name, sim in started.items()}
    finally:
        for sim in started.values():
            sim.close()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    # One client: a new one per request costs ~60 ms of TLS setup, which adds up here.
    with httpx.Client(timeout=10) as client:
        yield client


def root(base_url: str) -> str:
    return base_url.removesuffix("/v1")


def chat(http: httpx.Client, base_url: str, timeout_s: float = 10, **body: Any) -> httpx.Response:
    body.setdefault("model", "test-model")
    body.setdefault("messages", [{"role": "user", "content": NOTE}])
    return http.post(f"{base_url}/chat/completions", json=body, timeout=timeout_s)


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "extraction", "schema": schema, "strict": True}}


def content_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def reset(http: httpx.Client, base_url: str) -> None:
    http.post(f"{root(base_url)}/sim/reset").raise_for_status()


def stats(http: httpx.Client, base_url: str) -> dict[str, Any]:
    return http.get(f"{root(base_url)}/stats").json()


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)


# ------------------------------------------------------------ generate()


@pytest.mark.parametrize("name", ["clinical_note", "discharge_summary"])
@pytest.mark.parametrize("text", [NOTE, "", "68岁男性，高血压。", "Pt d/c'd home w/ services 2024-03-02."])
def test_generate_is_valid_for_the_real_schemas(schemas: Schemas, name: str, text: str) -> None:
    instance = generate(schemas[name], text)
    jsonschema.validate(instance, schemas[name])
    # and the worker's own validator accepts it
    SchemaLoader().get(name).validate_json(json.dumps(instance))


def test_generate_is_deterministic_and_copies_words_from_the_text(schemas: Schemas) -> None:
    schema = schemas["discharge_summary"]
    first = generate(schema, NOTE)
    assert first == generate(json.loads(json.dumps(schema)), NOTE)
    flat = " ".join(NOTE.split())
    values = list(strings_in(first))
    assert values, "a note with text should fill some string fields"
    for value in values:
        assert value in flat or value in schema["properties"]["discharge_disposition"]["enum"], value
    assert generate(schema, NOTE + " Follow up in 2 weeks.") != first


@pytest.mark.parametrize(
    ("text", "age"),
    [
        ("72-year-old man with chest pain", 72),
        ("Pt is 45 yo F", 45),
        ("58 y/o male", 58),
        ("Age: 81. Lives alone.", 81),
        ("68岁男性，高血压。", 68),
        ("Patient with chest pain since 3 days", None),
    ],
)
def test_generate_reads_the_age_from_the_text(schemas: Schemas, text: str, age: int | None) -> None:
    assert generate(schemas["clinical_note"], text)["age"] == age


def test_generate_uses_zero_for_a_missing_age_that_cannot_be_null() -> None:
    schema = {"type": "object", "properties": {"age_years": {"type": "integer"}}, "required": ["age_years"]}
    assert generate(schema, "no age here") == {"age_years": 0}
    assert generate(schema, "a 33-year-old") == {"age_years": 33}


def test_generate_picks_the_enum_value_the_text_mentions(schemas: Schemas) -> None:
    out = generate(schemas["clinical_note"], "62-year-old female, former smoker.")
    # "male" is listed first but only occurs inside "female"
    assert out["sex"] == "female"
    assert out["smoking_status"] == "former"
    assert generate(schemas["clinical_note"], "No tobacco history recorded.")["smoking_status"] is None
    not_nullable = {"type": "string", "enum": ["low", "high"]}
    assert generate(not_nullable, "nothing relevant") == "low"
    assert generate(not_nullable, "risk is HIGH") == "high"


def test_generate_fills_arrays_only_when_there_is_text(schemas: Schemas) -> None:
    assert len(generate(schemas["clinical_note"], NOTE)["medications"]) == 1
    assert generate(schemas["clinical_note"], "   ")["medications"] == []


# ------------------------------------------------------------ parse_faults()


def test_parse_faults_reads_kinds_and_rates() -> None:
    assert parse_faults("") == {}
    assert parse_faults("429:0.05, 500:0.02,timeout:0.01") == {"429": 0.05, "500": 0.02, "timeout": 0.01}
    assert parse_faults("429:0.7,503:0.3") == {"429": 0.7, "503": 0.3}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("boom:0.5", "unknown fault kind 'boom'"),
        ("429:2", "between 0 and 1"),
        ("429:-0.1", "between 0 and 1"),
        ("429:lots", "not a number"),
        ("429", "KIND:RATE"),
        ("429:0.6,500:0.6", "more than 1"),
        ("429:0.1,429:0.2", "twice"),
    ],
)
def test_parse_faults_names_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_faults(spec)


def test_seeded_fault_draws_repeat_and_follow_the_rates() -> None:
    faults = parse_faults("429:0.3,invalid:0.2")

    def draws(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [draw_outcome(rng, faults).value for _ in range(400)]

    first = draws(7)
    assert first == draws(7)
    assert first != draws(8)
    counts = Counter(first)
    assert set(counts) == {"ok", "429", "invalid"}
    # 120 and 80 expected; the bounds are four standard deviations wide
    assert 84 <= counts["429"] <= 156 and 48 <= counts["invalid"] <= 112


# ------------------------------------------------------------ the server


def test_models_lists_the_simulator(http: httpx.Client, sims: dict[str, str]) -> None:
    body = http.get(f"{sims['plain']}/models").json()
    assert body == {"object": "list", "data": [{"id": "medq-simulator", "object": "model", "owned_by": "medq"}]}


def test_served_models_are_listed_and_another_gets_ollamas_404(http: httpx.Client, sims: dict[str, str]) -> None:
    from medq.core.errors import ModelNotFound
    from worker.llm.client import LLMClient

    listed = [m["id"] for m in http.get(f"{sims['served']}/models").json()["data"]]
    assert listed == ["qwen2.5:1.5b", "llama3.2:1b", "gemma3:1b"]
    assert chat(http, sims["served"], model="llama3.2:1b").status_code == 200
    refused = chat(http, sims["served"], model="qwen2.5")
    assert refused.status_code == 404
    assert refused.json()["error"]["message"] == 'model "qwen2.5" not found, try pulling it first'
    # the worker's client reads it as a wrong model name, not as a refused request
    with pytest.raises(ModelNotFound, match="MEDQ_LLM__MODEL"):
        LLMClient(sims["served"], "x", "qwen2.5").complete(
            [{"role": "user", "content": NOTE}], response_format=None, max_tokens=8, temperature=0.0
        )


def test_context_tokens_cut_a_long_prompt_silently(http: httpx.Client, sims: dict[str, str], schemas: Schemas) -> None:
    schema = schemas["clinical_note"]
    short = chat(http, sims["context"], response_format=json_schema_format(schema))
    assert short.status_code == 200 and short.json()["usage"]["prompt_tokens"] < 100
    assert json.loads(content_of(short))["age"] == 72
    # 1,000 tokens of history first, the age at the end: the end is what Ollama's cut loses
    cut = chat(http, sims["context"], response_format=json_schema_format(schema),
               messages=[{"role": "user", "content": LONG_NOTE}])
    assert cut.status_code == 200 and cut.json()["choices"][0]["finish_reason"] == "stop"  # no error at all
    assert cut.json()["usage"]["prompt_tokens"] == 100
    assert json.loads(content_of(cut))["age"] is None  # answered from the part that was kept


def test_context_overflow_refuse_answers_like_llama_cpp(http: httpx.Client, sims: dict[str, str]) -> None:
    from medq.tools.simulator import _prompt_tokens

    base_url = sims["refuse"]
    reset(http, base_url)
    messages = [{"role": "user", "content": LONG_NOTE}]
    refused = chat(http, base_url, messages=messages)
    assert refused.status_code == 400
    n_prompt = _prompt_tokens(messages)
    assert n_prompt > 100
    assert refused.json() == {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": n_prompt,
            "n_ctx": 100,
        }
    }
    # A prompt that fits is answered, however large max_tokens is: llama.cpp compares the
    # prompt alone with its context (vLLM would refuse prompt + max_tokens > context).
    fits = chat(http, base_url, max_tokens=4000)
    assert fits.status_code == 200 and fits.json()["usage"]["prompt_tokens"] < 100
    assert stats(http, base_url)["outcomes"] == {"400": 1, "ok": 1}


def test_context_limits_are_said_only_with_advertise_context(http: httpx.Client, sims: dict[str, str]) -> None:
    advertised = http.get(f"{root(sims['advertise'])}/props")
    assert advertised.status_code == 200
    assert advertised.json()["default_generation_settings"]["n_ctx"] == 3000
    assert advertised.json()["total_slots"] == 3
    assert [m["max_model_len"] for m in http.get(f"{sims['advertise']}/models").json()["data"]] == [3000]
    # slots are said without a context size too, and then no size is invented
    slots_only = http.get(f"{root(sims['advertise-slots'])}/props").json()
    assert slots_only["total_slots"] == 5 and "n_ctx" not in slots_only["default_generation_settings"]
    assert "max_model_len" not in http.get(f"{sims['advertise-slots']}/models").json()["data"][0]
    # without the flag: a 404 as from Ollama, and models without a size, even with a context
    for name in ("plain", "context"):
        assert http.get(f"{root(sims[name])}/props").status_code == 404
        assert "max_model_len" not in http.get(f"{sims[name]}/models").json()["data"][0]


def test_context_overflow_must_be_cut_or_refuse() -> None:
    assert SimConfig(context_tokens=10, context_overflow="refuse").context_overflow == "refuse"
    with pytest.raises(ValueError, match="context_overflow must be one of cut, refuse"):
        SimConfig(context_overflow="truncate")


def test_openai_client_gets_schema_valid_json_via_json_schema(sims: dict[str, str], schemas: Schemas) -> None:
    schema = schemas["clinical_note"]
    client = openai.OpenAI(base_url=sims["plain"], api_key="x", max_retries=0)
    messages: Any = [{"role": "system", "content": "Extract."}, {"role": "user", "content": NOTE}]
    response_format: Any = json_schema_format(schema)
    answers = [
        client.chat.completions.create(model="qwen-test", messages=messages, response_format=response_format)
        for _ in range(2)
    ]
    completion = answers[0]
    assert completion.model == "qwen-test"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens >= 1
    data = json.loads(completion.choices[0].message.content or "")
    jsonschema.validate(data, schema)
    assert data["age"] == 72 and data["smoking_status"] == "former"
    # Same request, same answer, and the same as generate() in another process.
    assert answers[1].choices[0].message.content == completion.choices[0].message.content
    assert data == generate(schema, NOTE)


def test_llama_cpp_style_json_object_with_schema(http: httpx.Client, sims: dict[str, str], schemas: Schemas) -> None:
    schema = schemas["discharge_summary"]
    response = chat(http, sims["plain"], response_format={"type": "json_object", "schema": schema})
    data = json.loads(content_of(response))
    jsonschema.validate(data, schema)


def test_schema_in_the_system_prompt(http: httpx.Client, sims: dict[str, str], schemas: Schemas) -> None:
    schema = schemas["clinical_note"]
    system = (
        "You extract facts from clinical notes. Reply with one JSON object {like this}.\n"
        f"JSON Schema:\n{json.dumps(schema, indent=2)}\nNo prose."
    )
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "A few-shot example: 30-year-old."},
        {"role": "assistant", "content": "{}"},
        {"role": "user", "content": NOTE},
        {"role": "assistant", "content": "{}"},
        {"role": "user", "content": "That answer does not follow the JSON Schema: age is 30."},
    ]
    data = json.loads(
        content_of(chat(http, sims["plain"], messages=messages, response_format={"type": "json_object"}))
    )
    jsonschema.validate(data, schema)
    assert data["age"] == 72, "the record is the last user turn that is not a re-ask"
    assert json.loads(content_of(chat(http, sims["plain"]))) == {}, "no schema anywhere: an empty object"


def test_no_stream_refuses_a_streamed_request(http: httpx.Client, sims: dict[str, str]) -> None:
    assert chat(http, sims["no-stream"], stream=True).status_code == 400
    assert chat(http, sims["no-stream"]).status_code == 200


def test_a_streamed_answer_is_the_plain_answer_in_chunks_with_usage_last(
    sims: dict[str, str], schemas: Schemas
) -> None:
    client = openai.OpenAI(base_url=sims["plain"], api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": NOTE}]
    fmt: Any = json_schema_format(schemas["clinical_note"])
    plain = client.chat.completions.create(model="m", messages=messages, response_format=fmt)
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, response_format=fmt, stream=True, stream_options={"include_usage": True}
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and len(chunks) >= 2  # (one chunk at latency 0)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_closing_a_stream_stops_its_work_and_frees_the_slot(
    http: httpx.Client, sims: dict[str, str], schemas: Schemas
) -> None:
    base = sims["slow"]  # one slot, 1.5 s an answer
    http.post(root(base) + "/sim/reset")
    body = {"model": "m", "messages": [{"role": "user", "content": NOTE}], "stream": True,
            "response_format": json_schema_format(schemas["clinical_note"])}
    with http.stream("POST", base + "/chat/completions", json=body) as resp:
        lines = resp.iter_lines()  # kept: a generator dropped closes the response
        assert next(lines).startswith("data:")  # the answer has begun: its slot is taken
        assert http.get(root(base) + "/stats").json()["in_flight"] == 1
    # closed after its first chunk: the server stops, the slot is free for the next request
    for _ in range(100):
        stats = http.get(root(base) + "/stats").json()
        if stats["in_flight"] == 0:
            break
        time.sleep(0.02)
    assert stats["in_flight"] == 0 and stats["streams"] == 1 and stats["streams_closed"] == 1
    answered = chat(http, base)  # the one slot serves the next at once, not after the closed answer
    assert answered.status_code == 200


def test_reject_json_schema_mimics_llama_cpp_python(
    http: httpx.Client, sims: dict[str, str], schemas: Schemas
) -> None:
    schema = schemas["clinical_note"]
    refused = chat(http, sims["reject"], response_format=json_schema_format(schema))
    # llama-cpp-python's server answers 500 with pydantic's literal_error for response_format.type
    assert refused.status_code == 500
    error = refused.json()["error"]
    assert error["type"] == "internal_server_error"
    assert "response_format" in error["message"] and "json_object" in error["message"]
    fallback = chat(http, sims["reject"], response_format={"type": "json_object", "schema": schema})
    jsonschema.validate(json.loads(content_of(fallback)), schema)


@pytest.mark.parametrize("kind", ["429", "500", "503"])
def test_http_error_faults(http: httpx.Client, sims: dict[str, str], kind: str) -> None:
    response = chat(http, sims[f"fault-{kind}"])
    assert response.status_code == int(kind)
    assert response.json()["error"]["message"]
    if kind == "429":
        assert response.headers["retry-after"] == "1"


def test_openai_client_sees_429_as_rate_limit_with_retry_after(sims: dict[str, str]) -> None:
    client = openai.OpenAI(base_url=sims["fault-429"], api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": NOTE}])
    assert caught.value.response.headers["retry-after"] == "1"


def test_timeout_fault_never_answers(http: httpx.Client, sims: dict[str, str]) -> None:
    with pytest.raises(httpx.ReadTimeout):
        chat(http, sims["fault-timeout"], timeout_s=1)


@pytest.mark.parametrize("kind", ["malformed", "truncated", "invalid"])
def test_bad_content_faults(http: httpx.Client, sims: dict[str, str], schemas: Schemas, kind: str) -> None:
    schema = schemas["clinical_note"]
    response = chat(http, sims[f"fault-{kind}"], response_format=json_schema_format(schema), max_tokens=64)
    choice = response.json()["choices"][0]
    content = content_of(response)
    assert choice["finish_reason"] == ("length" if kind == "truncated" else "stop")
    if kind == "invalid":
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(content), schema)
    else:
        with pytest.raises(json.JSONDecodeError):
            json.loads(content)


def test_script_forces_outcomes_in_order(http: httpx.Client, sims: dict[str, str], schemas: Schemas) -> None:
    base_url = sims["plain"]
    schema = schemas["clinical_note"]
    reset(http, base_url)
    outcomes = ["invalid", "ok", "truncated", "429"]
    scripted = http.post(f"{root(base_url)}/sim/script", json={"outcomes": outcomes})
    assert scripted.status_code == 200
    answers = [chat(http, base_url, response_format=json_schema_format(schema)) for _ in range(5)]

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(content_of(answers[0])), schema)
    jsonschema.validate(json.loads(content_of(answers[1])), schema)
    assert answers[2].json()["choices"][0]["finish_reason"] == "length"
    assert answers[3].status_code == 429
    jsonschema.validate(json.loads(content_of(answers[4])), schema)  # script used up: back to normal
    assert stats(http, base_url)["outcomes"] == {"invalid": 1, "ok": 2, "truncated": 1, "429": 1}


def test_script_refuses_unknown_outcomes(http: httpx.Client, sims: dict[str, str]) -> None:
    response = http.post(f"{root(sims['plain'])}/sim/script", json={"outcomes": ["ok", "explode"]})
    assert response.status_code == 400
    assert "explode" in response.json()["error"]["message"]


def test_stats_count_requests_arrivals_and_max_tokens(http: httpx.Client, sims: dict[str, str]) -> None:
    base_url = sims["plain"]
    reset(http, base_url)
    before_s = time.time()
    chat(http, base_url, max_tokens=100)
    chat(http, base_url)
    chat(http, base_url, max_tokens=50)
    got = stats(http, base_url)
    assert got["requests"] == 3
    assert len(got["arrivals"]) == 3
    assert got["arrivals"] == sorted(got["arrivals"])
    assert before_s - 1 <= got["arrivals"][0] <= time.time() + 1
    assert got["max_tokens"] == [100, None, 50]
    assert got["outcomes"] == {"ok": 3}
    assert got["in_flight"] == 0
    http.get(f"{base_url}/models")
    assert stats(http, base_url)["requests"] == 3, "only chat completions are counted"
    reset(http, base_url)
    assert stats(http, base_url)["requests"] == 0


def test_parallel_caps_requests_served_at_once(http: httpx.Client, sims: dict[str, str]) -> None:
    base_url = sims["parallel"]
    reset(http, base_url)

    async def six_at_once() -> list[int]:
        async with httpx.AsyncClient(timeout=10) as client:
            body = {"model": "m", "messages": [{"role": "user", "content": NOTE}]}
            responses = await asyncio.gather(
                *(client.post(f"{base_url}/chat/completions", json=body) for _ in range(6))
            )
        return [r.status_code for r in responses]

    assert asyncio.run(six_at_once()) == [200] * 6
    got = stats(http, base_url)
    assert got["requests"] == 6
    assert got["max_in_flight"] == 2
    assert got["in_flight"] == 0
    # Arrivals are stamped before the wait for a slot: three rounds of 300 ms
    # would spread them over 600 ms or more if they were stamped after it.
    assert max(got["arrivals"]) - min(got["arrivals"]) < 0.5


# ------------------------------------------------------------ the command


@pytest.mark.parametrize(("spec", "named"), [("boom:0.5", "boom"), ("429:2", "between 0 and 1")])
def test_bad_fault_spec_stops_the_command_with_a_message(spec: str, named: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQ_")}
    env["COLUMNS"] = "200"  # keep the message on one line in typer's error box
    done = run_cli(["llm", "simulate", "--fault", spec, "--port", str(free_port())], env)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0
    assert named in output
    assert "--fault" in output
    assert "Traceback" not in output


def test_the_command_serves_and_stops_on_sigterm(start_process: Any, tmp_path: Path) -> None:
    """``medq llm simulate`` as users start it: it serves, and SIGTERM stops it at once,
    a request held by the timeout fault included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQ_")}
    port = free_port()
    proc: Proc = start_process([MEDQ, "llm", "simulate", "--port", str(port), "--fault", "timeout:1"], env,
                               name="simulator")
    base_url = f"http://127.0.0.1:{port}/v1"
    wait_http(f"{base_url}/models", proc)
    with httpx.Client(timeout=10) as http, pytest.raises(httpx.ReadTimeout):
        chat(http, base_url, timeout_s=0.5)  # held: it never answers
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(10) in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal
    assert f"medq simulator on {base_url}" in proc.log


def test_reask_prefix_matches_the_processor() -> None:
    from medq.tools.simulator import REASK_PREFIX
    from worker.extract.processor import REASK_PROMPT

    assert REASK_PROMPT.startswith(REASK_PREFIX)
