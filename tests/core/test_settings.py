"""Settings users write by hand: MEDQ_LLM__ENDPOINTS in its three spellings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from medq.core.settings import Settings


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://a:8000/v1", [("http://a:8000/v1", 1.0, None)]),
        ("http://a:8000/v1*3, http://b:11434/v1", [("http://a:8000/v1", 3.0, None), ("http://b:11434/v1", 1.0, None)]),
        ('[{"url": "http://b:11434/v1", "weight": 2, "model": "qwen2.5:7b"}, "http://c/v1"]',
         [("http://b:11434/v1", 2.0, "qwen2.5:7b"), ("http://c/v1", 1.0, None)]),
    ],
)
def test_endpoints_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: list) -> None:
    monkeypatch.setenv("MEDQ_LLM__ENDPOINTS", value)
    eps = Settings().llm.all_endpoints
    assert [(e.url, e.weight, e.model) for e in eps] == expected


def test_without_endpoints_the_base_url_is_the_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDQ_LLM__ENDPOINTS", raising=False)
    monkeypatch.setenv("MEDQ_LLM__BASE_URL", "http://127.0.0.1:9/v1")
    assert [e.url for e in Settings().llm.all_endpoints] == ["http://127.0.0.1:9/v1"]


def test_a_bad_weight_is_refused_with_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDQ_LLM__ENDPOINTS", "http://a/v1*0")
    with pytest.raises(ValidationError, match="weight"):
        Settings()
