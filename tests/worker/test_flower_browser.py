"""Flower in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium) logs in with the configured credentials while a
batch runs, sees the tasks listed and no record text, and keeps a screenshot in
tests/artifacts/. Without the login, Flower answers 401."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.helpers import MEDQ, REPO, Proc, free_port, headless_chromium, wait_http

CANARY = "ZZBROWSER"
ARTIFACTS = REPO / "tests" / "artifacts"


@pytest.fixture
def browser() -> Iterator[object]:
    with headless_chromium() as driver:
        yield driver


def _until_listed(browser: object, text: str, timeout_s: float = 30) -> None:
    """The tasks table is filled when the page loads: reload until ``text`` is in it."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout_s
    while True:
        if text in browser.find_element(By.TAG_NAME, "body").text:  # type: ignore[attr-defined]
            return
        if time.monotonic() > deadline:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "flower-tasks-timeout.png"))  # type: ignore[attr-defined]
            raise AssertionError(f"{text!r} not listed in Flower's tasks table after {timeout_s}s")
        time.sleep(0.5)
        browser.refresh()  # type: ignore[attr-defined]


def test_flower_in_a_browser_lists_the_tasks_and_no_record_text(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker_process: Callable[..., object],
    start_process: Callable[..., Proc], tmp_path: Path, browser: object,
) -> None:
    from selenium.webdriver.common.by import By

    port = free_port()
    env = {**medq_env, "MEDQ_FLOWER__USER": "ops", "MEDQ_FLOWER__PASSWORD": "pw-browser"}
    flower = start_process([MEDQ, "flower", "--port", str(port)], env, name="flower")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthcheck", flower)
    assert httpx.get(f"{url}/tasks", timeout=10).status_code == 401  # no login, no page

    worker_process(simulator("--latency-ms", "400", "--parallel", "4"), env={"MEDQ_LLM__MAX_IN_FLIGHT": "4"})
    notes = tmp_path / "n.jsonl"
    notes.write_text("".join(json.dumps({"id": f"b{i}", "text": f"{CANARY}{i} Ms {CANARY}NAME{i}, {30 + i} years."}) + "\n"
                             for i in range(48)), encoding="utf-8")
    # the batch runs while the browser looks (48 jobs at 4 in flight and 400 ms: about 5 s)
    enq = subprocess.Popen([MEDQ, "enqueue", str(notes), "--schema", "clinical_note", "--batch", "web", "--wait",
                            "--timeout-s", "90"], env=medq_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # log in: HTTP basic auth with the configured credentials, on every request of the page
        browser.execute_cdp_cmd("Network.enable", {})  # type: ignore[attr-defined]
        token = base64.b64encode(b"ops:pw-browser").decode()
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})  # type: ignore[attr-defined]
        browser.get(f"{url}/tasks")  # type: ignore[attr-defined]
        _until_listed(browser, "medq.extract")
        time.sleep(1.0)  # let the table settle for the screenshot
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "flower-tasks.png"
        browser.save_screenshot(str(shot))  # type: ignore[attr-defined]
        assert shot.stat().st_size > 10_000
        page = browser.page_source  # type: ignore[attr-defined]
        table = browser.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
        assert "medq.extract_many" in table
        assert CANARY not in page and CANARY not in table
        assert enq.wait(90) == 0, enq.stderr.read().decode() if enq.stderr else ""
        _until_listed(browser, "SUCCESS")
        assert CANARY not in browser.page_source  # type: ignore[attr-defined]
    finally:
        if enq.poll() is None:
            enq.kill()
