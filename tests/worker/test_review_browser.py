"""`medq review` end to end: a real worker on the simulator extracts an English and a Chinese
note (encryption at rest on), and the page it writes, opened offline in headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium), highlights each value on the words of the note it
was read from, fetching nothing. A screenshot is kept in tests/artifacts/review.png."""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import REPO, headless_chromium, run_cli

ARTIFACTS = REPO / "tests" / "artifacts"
NOTES = {
    "en": "Mr Lee is a 72-year-old male with hypertension. Metformin 500 mg twice daily. Never smoker.",
    "zh": "患者男，68岁。高血压病史10年，服用氨氯地平5mg每日一次。吸烟。",
}


@pytest.fixture
def offline_browser() -> Iterator[object]:
    with headless_chromium() as driver:
        # the network is cut: a hospital reviewer's machine may have none
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                               {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
        yield driver


def test_review_page_highlights_each_value_on_its_words_offline(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    tmp_path: Path, offline_browser: object,
) -> None:
    from cryptography.fernet import Fernet

    # encryption on: the stored records the page reads from Redis are sealed
    medq_env = {**medq_env, "MEDQ_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    records = tmp_path / "notes.jsonl"
    records.write_text("".join(json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n" for k, v in NOTES.items()),
                       encoding="utf-8")
    enq = ["enqueue", str(records), "--schema", "clinical_note"]
    res = run_cli(enq, medq_env)
    assert res.returncode == 0, res.stderr
    batch = res.stdout.strip()

    # before any worker runs, the notes come from the records stored in Redis, sealed
    stored = [r.get(k) for k in r.scan_iter("medq:payload:*")]
    assert len(stored) == 2 and all(v.startswith(b"medq-fernet:") for v in stored)  # type: ignore[union-attr]
    early = tmp_path / "early.html"
    res = run_cli(["review", batch, "-o", str(early)], medq_env)
    assert res.returncode == 0, res.stderr
    assert "note from the stored record" in early.read_text(encoding="utf-8")
    assert "氨氯地平" in early.read_text(encoding="utf-8")

    # the simulator copies phrases of the note into the values
    worker(simulator(), env={"MEDQ_ENCRYPTION_KEY": medq_env["MEDQ_ENCRYPTION_KEY"]})
    res = run_cli([*enq, "--wait", "--timeout-s", "120"], medq_env)  # the same batch: waits for it
    assert res.returncode == 0 and res.stdout.strip() == batch, res.stderr

    # succeeded: the stored records are gone, and the page says where to get the notes from
    bare = tmp_path / "bare.html"
    assert run_cli(["review", batch, "-o", str(bare)], medq_env).returncode == 0
    assert "pass the file it was enqueued from with --notes" in bare.read_text(encoding="utf-8")
    assert NOTES["en"] not in bare.read_text(encoding="utf-8")

    # a notes file edited since: its offsets would point at other words, so no highlights
    edited = tmp_path / "edited.jsonl"
    edited.write_text(json.dumps({"id": "en", "text": "Ms Kim, 64. " + NOTES["en"]}) + "\n", encoding="utf-8")
    stale = tmp_path / "stale.html"
    assert run_cli(["review", batch, "--notes", str(edited), "-o", str(stale)], medq_env).returncode == 0
    en_section = stale.read_text(encoding="utf-8").split('data-record="en"')[1].split("</section>")[0]
    assert "differs from the one that was extracted" in en_section and "<mark" not in en_section

    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"id": "en", "data": {"age": 72}}) + "\n" + json.dumps({"id": "zh", "data": {"age": 50}}) + "\n",
                    encoding="utf-8")
    page = tmp_path / "out.html"
    res = run_cli(["review", batch, "--notes", str(records), "--gold", str(gold), "-o", str(page)], medq_env)
    assert res.returncode == 0, res.stderr
    assert "PHI" in res.stderr and stat.S_IMODE(page.stat().st_mode) == 0o600
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"https?://", text)  # nothing to fetch: no CDN, fonts or scripts

    browser = offline_browser
    browser.get(page.as_uri())  # type: ignore[attr-defined]
    marks = browser.execute_script(  # type: ignore[attr-defined]
        """const out = {};
        for (const s of document.querySelectorAll('section.record')) {
          const m = s.querySelector('mark[data-path~="age"]');
          const row = s.querySelector('tr[data-path="age"]');
          out[s.dataset.record] = {age: m && m.textContent, row: row && row.className,
                                   note: s.querySelector('pre.note').textContent};
        }
        return out;""")
    assert marks["en"]["age"] == "72" and marks["zh"]["age"] == "68"
    assert marks["en"]["note"] == NOTES["en"] and marks["zh"]["note"] == NOTES["zh"]  # each note whole, once
    assert "right" in marks["en"]["row"].split() and "wrong" in marks["zh"]["row"].split()
    resources = browser.execute_script("return performance.getEntriesByType('resource').length")  # type: ignore[attr-defined]
    assert resources == 0  # the page asked the network for nothing
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "review.png"
    browser.save_screenshot(str(shot))  # type: ignore[attr-defined]
    assert shot.stat().st_size > 10_000
