"""MedicalDataProcessor against the simulator over real HTTP, on both paths: ``process``
(blocking, users' way) and ``aprocess`` (the worker engine's), through ``processor``."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from medq.core.errors import (
    EndpointMisconfigured,
    EndpointTimeout,
    EndpointUnavailable,
    OutputInvalid,
    OutputTruncated,
    Overloaded,
    PromptTruncated,
    RateLimited,
    RequestRejected,
    ServerError,
)
from medq.core.schemas import SchemaLoader
from tests.helpers import free_port
from tests.llm_paths import PATHS, Driven
from worker.extract.processor import MedicalDataProcessor, _check_prompt_read
from worker.llm.client import Completion

NOTE = "CANARY-P1 Mr Lee is a 72-year-old male with hypertension. Metformin 500 mg twice daily. Never smoker."


@pytest.fixture(params=PATHS)
def processor(request: pytest.FixtureRequest) -> Callable[..., Driven]:
    """A processor for ``base_url`` whose ``process`` takes the path under test."""

    def make(base_url: str, **kw: object) -> Driven:
        proc = MedicalDataProcessor("sim-model", "sk-test", base_url, SchemaLoader(), **kw)  # type: ignore[arg-type]
        return Driven(proc, request.param)

    return make


def _script(base_url: str, *outcomes: str) -> None:
    httpx.post(base_url.removesuffix("/v1") + "/sim/script", json={"outcomes": list(outcomes)}).raise_for_status()


def _stats(base_url: str) -> dict:
    return httpx.get(base_url.removesuffix("/v1") + "/stats").json()


@pytest.fixture
def sim(simulator: Callable[..., str]) -> str:
    return simulator()


def test_valid_output_with_provenance(sim: str, processor: Callable[..., Driven]) -> None:
    ex = processor(sim).process(NOTE, "clinical_note", record_id="r1")
    assert ex.data.age == 72  # the simulator reads the age from the text
    prov = ex.provenance
    assert prov.endpoint == sim and prov.model == "sim-model"
    assert prov.response_format == "json_schema" and prov.llm_calls == 1 and prov.finish_reason == "stop"
    assert prov.usage["prompt_tokens"] > 0 and prov.usage["completion_tokens"] > 0
    assert prov.latency_ms > 0


def test_steps_down_to_json_object_schema_for_llama_cpp_and_remembers(
    simulator: Callable[..., str], processor: Callable[..., Driven]
) -> None:
    sim = simulator("--reject-json-schema")
    proc = processor(sim)
    first = proc.process(NOTE, "clinical_note")
    assert first.provenance.response_format == "json_object_schema"
    assert _stats(sim)["requests"] == 2  # one refused json_schema (HTTP 500, as llama-cpp-python does), one json_object+schema
    proc.process(NOTE, "clinical_note")
    assert _stats(sim)["requests"] == 3  # the refused form is not tried again


def test_fixed_response_format_does_not_step_down(
    simulator: Callable[..., str], processor: Callable[..., Driven]
) -> None:
    sim = simulator("--reject-json-schema")
    with pytest.raises(RequestRejected) as exc:  # permanent: the job goes to dead letters, not round the retries
        processor(sim, response_format="json_schema").process(NOTE, "clinical_note", record_id="r9")
    assert "HTTP 500" in str(exc.value) and "response_format" in str(exc.value)


def test_reasks_after_an_invalid_answer(sim: str, processor: Callable[..., Driven]) -> None:
    _script(sim, "invalid", "ok")
    ex = processor(sim).process(NOTE, "clinical_note")
    assert ex.provenance.reasks == 1 and ex.provenance.llm_calls == 2
    assert ex.data.age == 72


def test_malformed_json_is_reasked(sim: str, processor: Callable[..., Driven]) -> None:
    _script(sim, "malformed", "ok")
    assert processor(sim).process(NOTE, "clinical_note").provenance.reasks == 1


def test_gives_up_after_the_reasks_without_quoting_the_answer(sim: str, processor: Callable[..., Driven]) -> None:
    _script(sim, "invalid", "invalid", "invalid")
    with pytest.raises(OutputInvalid) as exc:
        processor(sim, reasks=2).process(NOTE, "clinical_note", record_id="r7")
    msg = str(exc.value)
    assert "record r7" in msg and "after 2 re-asks" in msg
    assert "CANARY" not in msg and "Lee" not in msg


def test_truncation_asks_again_with_more_tokens(sim: str, processor: Callable[..., Driven]) -> None:
    _script(sim, "truncated", "ok")
    ex = processor(sim, max_tokens=256, max_tokens_cap=1024).process(NOTE, "clinical_note")
    assert ex.provenance.truncations == 1 and ex.provenance.reasks == 0
    assert _stats(sim)["max_tokens"] == [256, 512]


def test_truncation_is_bounded(sim: str, processor: Callable[..., Driven]) -> None:
    _script(sim, "truncated", "truncated", "truncated", "truncated")
    with pytest.raises(OutputTruncated, match="MAX_TOKENS_CAP"):
        processor(sim, max_tokens=256, max_tokens_cap=512).process(NOTE, "clinical_note")
    assert _stats(sim)["max_tokens"] == [256, 512]


def test_a_shorter_prompt_leaves_the_schema_to_the_response_format(sim: str, processor: Callable[..., Driven]) -> None:
    proc = processor(sim, schema_in_prompt=False)
    [part] = proc._parts_for(SchemaLoader().get("clinical_note"), True)
    assert "JSON Schema:" not in part.system and "- medications (list of {name, dose, frequency})" in part.system
    assert len(part.system) < len(processor(sim)._parts_for(SchemaLoader().get("clinical_note"), True)[0].system) - 1000
    ex = proc.process(NOTE, "clinical_note")
    assert ex.data.age == 72 and ex.provenance.response_format == "json_schema"


def test_an_answer_that_loops_until_max_tokens_is_kept_in_part_not_asked_again_with_more(
    sim: str, processor: Callable[..., Driven]
) -> None:
    _script(sim, "runaway")  # the first list's item repeated until max_tokens, cut mid-item
    ex = processor(sim, max_tokens=512, max_tokens_cap=4096).process(NOTE, "clinical_note")
    prov = ex.provenance
    assert prov.runaway_answers == 1 and prov.truncations == 1 and prov.llm_calls == 1
    assert _stats(sim)["max_tokens"] == [512]  # not 1024, 2048 and 4096 of the same loop
    assert len(ex.data.diagnoses) == 1  # the repeats are one item
    assert ex.data.age == 72  # what was complete before the loop is kept


@pytest.mark.parametrize(("outcome", "error"), [("429", RateLimited), ("500", ServerError), ("503", Overloaded)])
def test_endpoint_errors_are_retryable(sim: str, outcome: str, error: type, processor: Callable[..., Driven]) -> None:
    _script(sim, outcome)
    with pytest.raises(error) as exc:
        processor(sim).process(NOTE, "clinical_note", record_id="r2")
    assert f"HTTP {outcome}" in str(exc.value)
    assert "CANARY" not in str(exc.value)
    if outcome == "429":
        assert exc.value.retry_after_s == 1.0
    assert _stats(sim)["requests"] == 1  # the client does not retry: the task does


def test_timeout_is_retryable(sim: str, processor: Callable[..., Driven]) -> None:
    _script(sim, "timeout")
    with pytest.raises(EndpointTimeout):
        processor(sim, timeout_s=1).process(NOTE, "clinical_note")


def test_connection_refused_is_retryable(processor: Callable[..., Driven]) -> None:
    with pytest.raises(EndpointUnavailable, match="cannot connect"):
        processor(f"http://127.0.0.1:{free_port()}/v1").process(NOTE, "clinical_note")


def test_enum_survives_the_llama_cpp_grammar_conversion() -> None:
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar")
    import json

    from worker.llm.client import grammar_schema

    schema = SchemaLoader().get("clinical_note").json_schema
    gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(grammar_schema(schema)))
    assert '"\\"male\\"" | "\\"female\\"" | "null"' in gbnf


def test_grammar_bounds_open_strings_and_lists() -> None:
    from worker.llm.client import GRAMMAR_MAX_ITEMS, GRAMMAR_MAX_STRING_CHARS, grammar_schema

    meds = grammar_schema(SchemaLoader().get("clinical_note").json_schema)["properties"]["medications"]
    assert meds["maxItems"] == GRAMMAR_MAX_ITEMS
    assert meds["items"]["properties"]["name"]["maxLength"] == GRAMMAR_MAX_STRING_CHARS
    assert grammar_schema({"type": "string", "maxLength": 5}) == {"type": "string", "maxLength": 5}


def test_fields_strategy_asks_once_per_field_and_merges(sim: str, processor: Callable[..., Driven]) -> None:
    proc = processor(sim, strategy="fields")
    ex = proc.process(NOTE, "clinical_note", record_id="f1")
    fields = SchemaLoader().get("clinical_note").field_names
    assert ex.provenance.strategy == "fields" and ex.provenance.llm_calls == len(fields)
    assert _stats(sim)["requests"] == len(fields)
    assert ex.data.age == 72
    # every call of a record starts with the same system turn and the note, so a
    # server's prefix cache evaluates the note once per record, not once per field
    parts = proc._parts_for(SchemaLoader().get("clinical_note"), proc.few_shot)
    assert len({p.system for p in parts}) == 1


def test_invented_values_are_flagged_or_dropped(sim: str, processor: Callable[..., Driven]) -> None:
    _script(sim, "invented")
    flagged = processor(sim).process(NOTE, "clinical_note")
    assert "age" in flagged.provenance.ungrounded_fields  # 131 is not in the note
    assert "diagnoses[0]" in flagged.provenance.ungrounded_fields
    assert flagged.data.age == 131 and flagged.provenance.dropped_fields == []

    _script(sim, "invented")
    dropped = processor(sim, grounding="drop").process(NOTE, "clinical_note")
    assert dropped.provenance.dropped_fields == flagged.provenance.ungrounded_fields
    assert dropped.data.age is None and dropped.data.diagnoses == [] and dropped.data.medications == []


LONG_NOTE = NOTE + " Seen yearly in clinic, blood pressure reviewed, no change." * 300  # about 18,000 characters


def _slices_hold(ex: object, note: str) -> None:
    """Every evidence span slices the whole note (not a piece) to text with its value in it."""
    from worker.extract.evidence import normalize, value_at

    data = ex.data_dict()  # type: ignore[attr-defined]
    assert ex.evidence  # type: ignore[attr-defined]
    for path, spans in ex.evidence.items():  # type: ignore[attr-defined]
        value = value_at(data, path)
        for a, b in spans:
            assert normalize(str(value)) in normalize(note[a:b]) or str(value) in note[a:b], (path, value, note[a:b])


@pytest.mark.parametrize("strategy", ["single", "fields"])
def test_a_note_the_server_cut_to_its_context_is_read_again_in_pieces(
    simulator: Callable[..., str], strategy: str, processor: Callable[..., Driven]
) -> None:
    sim = simulator("--context-tokens", "2048")  # cuts longer prompts silently, as Ollama does
    proc = processor(sim, strategy=strategy)
    ex = proc.process(LONG_NOTE, "clinical_note", record_id="r7")
    prov = ex.provenance
    assert prov.pieces > 5 and prov.context_tokens == 2048  # learned from what the server read
    assert ex.data.age == 72
    _slices_hold(ex, LONG_NOTE)
    assert proc.process(NOTE, "clinical_note").provenance.pieces == 1  # a note that fits is read whole


def test_a_server_that_refuses_a_long_prompt_tells_its_context_and_the_note_goes_in_pieces(
    simulator: Callable[..., str], processor: Callable[..., Driven]
) -> None:
    sim = simulator("--context-tokens", "3000", "--context-overflow", "refuse")  # llama.cpp's 400 with n_ctx
    ex = processor(sim).process(LONG_NOTE, "clinical_note", record_id="r9")
    assert ex.provenance.pieces > 3 and ex.provenance.context_tokens == 3000 and ex.data.age == 72
    assert _stats(sim)["outcomes"].get("400") == 1  # one refusal; every piece fitted
    _slices_hold(ex, LONG_NOTE)

    known = processor(sim, context_tokens=3000)  # MEDQ_LLM__CONTEXT_TOKENS, or learned at worker start
    httpx.post(sim.removesuffix("/v1") + "/sim/reset").raise_for_status()
    assert known.process(LONG_NOTE, "clinical_note").provenance.pieces > 3
    assert _stats(sim)["outcomes"].get("400") is None


def test_a_context_too_small_for_the_prompt_fails_saying_what_to_raise(
    simulator: Callable[..., str], processor: Callable[..., Driven]
) -> None:
    sim = simulator("--context-tokens", "300")
    with pytest.raises(EndpointMisconfigured, match=r"^record r7: .*context of 300 tokens leaves no room") as exc:
        processor(sim).process(LONG_NOTE, "clinical_note", record_id="r7")
    assert "clinic" not in str(exc.value) and "OLLAMA_CONTEXT_LENGTH" in str(exc.value)


@pytest.mark.parametrize(
    ("prompt_tokens", "at_least", "cut"),
    [
        (1500, 3000, True),  # read half of it
        (3100, 3000, False),
        (0, 3000, False),  # the server reports no usage: not a cut
        (100, 200, False),  # a prompt this small: the bound says too little
    ],
)
def test_prompt_read_check(prompt_tokens: int, at_least: int, cut: bool) -> None:
    answer = Completion(content="{}", finish_reason="stop", model="m", prompt_tokens=prompt_tokens)
    if cut:
        with pytest.raises(PromptTruncated, match=f"read {prompt_tokens} of at least {at_least}"):
            _check_prompt_read(answer, at_least, "http://e/v1", "r1")
    else:
        _check_prompt_read(answer, at_least, "http://e/v1", "r1")
