"""A Redis with a password (as docker-compose runs it) and an ACL user: producers and
workers take the credentials from MEDQ_REDIS_URL; without them nothing gets in."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import private_redis, run_cli


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[int]:
    """redis-server on a free port: default user off, one ACL user ``medq`` with a password."""
    with private_redis(tmp_path, "--user", "default", "off", "--user", "medq", "on", ">s3cret-acl", "~*", "&*", "+@all") as port:
        yield port


def test_producer_and_worker_use_the_credentials_in_the_url(
    locked_redis: int, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    tmp_path: Path,
) -> None:
    notes = tmp_path / "n.jsonl"
    notes.write_text("".join(json.dumps({"id": f"a{i}", "text": f"{30 + i}-year-old man, cough."}) + "\n" for i in range(5)))

    anonymous = {**medq_env, "MEDQ_REDIS_URL": f"redis://127.0.0.1:{locked_redis}/0"}
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "acl"], anonymous)
    assert res.returncode != 0  # no credentials, no way in
    assert not redis.Redis(port=locked_redis, username="medq", password="s3cret-acl").keys("medq:*")

    env = {**medq_env, "MEDQ_REDIS_URL": f"redis://medq:s3cret-acl@127.0.0.1:{locked_redis}/0"}
    worker(simulator(), env={"MEDQ_REDIS_URL": env["MEDQ_REDIS_URL"]})
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "acl", "--wait", "--timeout-s", "60"], env)
    assert res.returncode == 0, res.stderr
    docs = [json.loads(x) for x in run_cli(["results", "acl"], env).stdout.splitlines()]
    assert [d["status"] for d in docs] == ["succeeded"] * 5
    assert "s3cret-acl" not in res.stdout + res.stderr  # the URL's password is not echoed
