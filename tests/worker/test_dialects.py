"""Servers that speak their own response_format: auto mode ends on the form each one takes.

TGI (Text Generation Inference) takes only ``{"type": "json", "value": schema}`` and
answers 422, as plain text, to OpenAI's and llama.cpp's forms; ``medq llm simulate
--dialect tgi`` does the same."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import httpx
import jsonschema
import pytest
import redis

from medq.core.schemas import SchemaLoader
from medq.core.settings import ResponseFormat
from tests.helpers import run_cli
from tests.llm_paths import PATHS, Driven
from worker.extract.processor import MedicalDataProcessor
from worker.llm.client import (
    RESPONSE_FORMATS,
    FormatRejected,
    error_for_status,
    response_format_for,
)

NOTE = "Mr Tan is a 64-year-old male with asthma. Salbutamol 100 mcg as needed. Never smoker."
MESSAGES = [{"role": "user", "content": NOTE}]


def _stats(base_url: str) -> dict:
    return httpx.get(base_url.removesuffix("/v1") + "/stats").json()


@pytest.mark.parametrize(
    "said",
    [
        # TGI 2.x to OpenAI's form, and to a json_object without value (its alias of json)
        (
            "Failed to deserialize the JSON body into the target type: response_format: unknown variant "
            "`json_schema`, expected `json` or `regex` at line 1 column 412"
        ),
        (
            "Failed to deserialize the JSON body into the target type: response_format: missing field `value` "
            "at line 1 column 168"
        ),
    ],
)
def test_tgi_refusals_are_format_rejections(said: str) -> None:
    # axum's rejection is a plain-text body, not an OpenAI error object
    err = error_for_status(422, {}, said, "http://tgi:8080/v1")
    assert type(err) is FormatRejected  # auto mode steps down; a fixed mode fails the job permanently


def test_tgi_form_carries_the_plain_schema() -> None:
    schema = SchemaLoader().get("clinical_note").json_schema
    assert response_format_for("tgi", "clinical_note", schema) == {"type": "json", "value": schema}


def test_every_response_format_is_a_setting() -> None:
    assert set(get_args(ResponseFormat)) == {"auto", *RESPONSE_FORMATS}


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("json_schema", "unknown variant `json_schema`, expected `json` or `regex`"),
        ("json_object_schema", "missing field `value`"),
        ("json_object", "missing field `value`"),
    ],
)
def test_simulated_tgi_refuses_other_forms_as_tgi_does(simulator: Callable[..., str], mode: str, said: str) -> None:
    sim = simulator("--dialect", "tgi")
    schema = SchemaLoader().get("clinical_note").json_schema
    body = {"model": "tgi", "messages": MESSAGES, "max_tokens": 200, "response_format": response_format_for(mode, "c", schema)}
    resp = httpx.post(f"{sim}/chat/completions", json=body)
    assert resp.status_code == 422
    assert resp.text.startswith("Failed to deserialize the JSON body into the target type: response_format: ")
    assert said in resp.text


def test_simulated_tgi_answers_its_own_form_from_the_schema_in_value(simulator: Callable[..., str]) -> None:
    sim = simulator("--dialect", "tgi")
    schema = SchemaLoader().get("clinical_note").json_schema
    body = {"model": "tgi", "messages": MESSAGES, "max_tokens": 200, "response_format": {"type": "json", "value": schema}}
    resp = httpx.post(f"{sim}/chat/completions", json=body)
    assert resp.status_code == 200
    answer = json.loads(resp.json()["choices"][0]["message"]["content"])
    jsonschema.validate(answer, schema)
    assert answer["age"] == 64


@pytest.mark.parametrize("path", PATHS)
def test_processor_on_tgi_steps_down_to_its_form_and_remembers(simulator: Callable[..., str], path: str) -> None:
    sim = simulator("--dialect", "tgi")
    proc = Driven(MedicalDataProcessor("tgi", "sk-test", sim, SchemaLoader()), path)
    first = proc.process(NOTE, "clinical_note", record_id="r1")
    assert first.provenance.response_format == "tgi" and first.data.age == 64
    proc.process(NOTE, "clinical_note", record_id="r2")
    # json_schema and json_object+schema refused once each; then only TGI's form
    assert _stats(sim)["response_formats"] == {"json_schema": 1, "json_object": 1, "json": 2}


def test_worker_on_tgi_gets_constrained_answers(
    r: redis.Redis, simulator: Callable[..., str], worker: Callable[..., object], medq_env: dict[str, str], tmp_path: Path
) -> None:
    sim = simulator("--dialect", "tgi")
    worker(sim)
    notes = tmp_path / "notes.jsonl"
    notes.write_text(json.dumps({"id": "t1", "text": NOTE}) + "\n", encoding="utf-8")
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--wait", "--timeout-s", "120"], medq_env)
    assert res.returncode == 0, res.stderr
    out = run_cli(["results", res.stdout.strip()], medq_env)
    assert out.returncode == 0, out.stderr
    [doc] = [json.loads(line) for line in out.stdout.splitlines()]
    assert doc["status"] == "succeeded" and doc["data"]["age"] == 64
    assert doc["provenance"]["response_format"] == "tgi"
    stats = _stats(sim)
    # every answer the simulator gave was to a schema-constrained request
    assert stats["outcomes"]["ok"] == stats["response_formats"]["json"] >= 1
    assert "none" not in stats["response_formats"]
