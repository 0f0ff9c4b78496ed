"""`medq bench`: one command that measures the ceiling, medq and the overhead side by side."""

from __future__ import annotations

import json

import pytest
import redis

from tests.helpers import run_cli
from tests.rabbitmq import own_vhost, queues, skip_unless_rabbitmq

pytestmark = pytest.mark.e2e  # medq bench runs real worker processes


def test_bench_reports_every_figure_from_one_run(r: redis.Redis, medq_env: dict[str, str]) -> None:
    res = run_cli(["bench", "--jobs", "60", "--latency-ms", "50", "--parallel", "8", "--overhead-jobs", "60", "--json"],
                  medq_env, timeout_s=300)
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads(res.stdout)
    assert d["ceiling"]["ok"] == 60 and d["medq"]["jobs"] == 60 and d["medq"]["failed"] == 0
    assert d["overhead"]["jobs"] == 60 and d["overhead"]["failed"] == 0
    assert 0 < d["utilisation"] <= 1.1  # the queue cannot beat a direct client by more than noise
    for phase in ("medq", "overhead"):
        row = d[phase]
        assert 0 < row["p50_ms"] <= row["p95_ms"]
        assert row["worker_cpu_ms_per_job"] > 0 and row["redis_commands_per_job"] > 10
    # 8 in flight at 50 ms: the simulator cannot give more than 160 jobs/s; a ceiling above
    # that would mean the direct client did not wait for the answers
    assert d["ceiling"]["jobs_per_s"] <= 8 / 0.05 * 1.05
    assert "utilisation" in run_cli(["bench", "--help"], medq_env).stdout


@pytest.mark.rabbitmq
def test_bench_compares_rabbitmq_with_redis_in_the_same_run(r: redis.Redis, medq_env: dict[str, str]) -> None:
    skip_unless_rabbitmq()
    with own_vhost() as (vhost, url):
        res = run_cli(["bench", "--jobs", "60", "--latency-ms", "50", "--parallel", "8", "--no-overhead",
                       "--compare-broker", url, "--json"], medq_env, timeout_s=300)
        assert res.returncode == 0, res.stderr[-3000:]
        sent_through_rabbitmq = queues(vhost, "messages")
    d = json.loads(res.stdout)
    assert (d["broker"], d["compare"]["broker"]) == ("Redis", "RabbitMQ")
    assert d["medq"]["jobs"] == d["compare"]["medq"]["jobs"] == 60 and d["compare"]["medq"]["failed"] == 0
    assert 0 < d["compare"]["utilisation"] <= 1.1
    assert "medq" in sent_through_rabbitmq  # the second phase's messages went through RabbitMQ
