"""`medq metrics`: what the workers counted, summed over processes, for Prometheus.
Real worker, simulator and exporter processes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from medq.state.prometheus import HELP
from tests.helpers import MEDQ, REPO, Proc, free_port, run_cli, wait_http

CANARY = "ZZMETRIC"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_count_jobs_calls_tokens_reasks_and_truncations(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    start_process: Callable[..., Proc], tmp_path: Path,
) -> None:
    base = simulator()
    # three jobs meet trouble: a 429 (retried), a cut-off answer (asked again with more
    # tokens), an answer that breaks the schema (re-asked)
    httpx.post(base.removesuffix("/v1") + "/sim/script", json={"outcomes": ["429", "truncated", "invalid"]}).raise_for_status()
    worker(base)
    notes = tmp_path / "n.jsonl"
    notes.write_text("".join(json.dumps({"id": f"m{i}", "text": f"{CANARY} {40 + i}-year-old woman, fever."}) + "\n"
                             for i in range(10)), encoding="utf-8")
    assert run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "met", "--wait", "--timeout-s", "60"],
                   medq_env).returncode == 0

    port = free_port()
    exporter = start_process([MEDQ, "metrics", "--port", str(port)], {**medq_env, "MEDQ_LLM__BASE_URL": base}, name="metrics")
    url = f"http://127.0.0.1:{port}/metrics"
    wait_http(url, exporter)
    done = ("medq_jobs_total", (("outcome", "succeeded"), ("schema", "clinical_note")))
    deadline = time.monotonic() + 15  # workers add their counts every 2 s
    while True:
        text = httpx.get(url, timeout=10).text
        got = _samples(text)
        if got.get(done) == 10 or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    schema = (("schema", "clinical_note"),)
    ep = (("endpoint", base),)
    assert got[done] == 10
    assert got[("medq_jobs_total", (("outcome", "retried"), ("schema", "clinical_note")))] == 1
    assert got[("medq_retries_total", (("kind", "rate_limited"), ("schema", "clinical_note")))] == 1
    assert got[("medq_reasks_total", schema)] == 1
    assert got[("medq_truncations_total", schema)] == 1
    assert got[("medq_llm_request_seconds_count", ep)] == 13  # 10 jobs + the 429 + 2 asked again
    assert got[("medq_llm_request_seconds_bucket", (("endpoint", base), ("le", "+Inf")))] == 13
    assert got[("medq_llm_errors_total", (("endpoint", base), ("kind", "rate_limited")))] == 1
    assert got[("medq_llm_tokens_total", (("direction", "in"), ("endpoint", base)))] > 1000
    assert got[("medq_llm_tokens_total", (("direction", "out"), ("endpoint", base)))] > 0
    assert got[("medq_queue_messages", ())] == 0 and got[("medq_endpoint_in_flight", ep)] == 0
    assert got[("medq_endpoint_cap", ep)] > 0
    assert CANARY not in text and "m0" not in text  # labels are schemas, endpoints and kinds only

    # the Grafana dashboard in configs/ asks only for series the exporter serves
    dashboard = json.loads((REPO / "configs" / "grafana-medq.json").read_text())
    asked = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"medq_[a-z_]+", t["expr"])}

    # what was served in this run (gauges included), and every counter or histogram the
    # exporter knows (a counter is only served once something was counted)
    known = {name for name, _ in got} | {f"{k}{suffix}" for k in HELP for suffix in ("_total", "_bucket", "_sum", "_count")}
    assert len(asked) >= 10 and asked <= known, asked - known

    # jobs in progress show as running: three answers that never come (the worker waits
    # for its 10 s timeout meanwhile)
    assert got[("medq_jobs_running", ())] == 0
    httpx.post(base.removesuffix("/v1") + "/sim/script", json={"outcomes": ["timeout"] * 3}).raise_for_status()
    slow = tmp_path / "slow.jsonl"
    slow.write_text("".join(json.dumps({"id": f"s{i}", "text": f"{50 + i}-year-old man."}) + "\n" for i in range(3)))
    assert run_cli(["enqueue", str(slow), "--schema", "clinical_note", "--batch", "slow"], medq_env).returncode == 0
    deadline = time.monotonic() + 8
    while _samples(httpx.get(url, timeout=10).text).get(("medq_jobs_running", ())) != 3:
        assert time.monotonic() < deadline, "the three held jobs never showed as running"
        time.sleep(0.3)
