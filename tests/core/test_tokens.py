"""The token estimate without a tokenizer: admission to a tokens-per-minute limit."""

from __future__ import annotations

import re

from medq.core.tokens import estimate_text_tokens
from medq.state.endpoints import estimate_tokens

CHINESE_NOTE = (
    "患者男性，72岁，因胸痛三小时入院。既往高血压病史十年，糖尿病五年。"
    "目前服用二甲双胍500毫克，每日两次。对青霉素过敏。无吸烟史。"
)
ENGLISH_NOTE = (
    "72-year-old man admitted with three hours of chest pain. Hypertension for ten years, "
    "diabetes for five. Takes metformin 500 mg twice daily. Allergic to penicillin. Never smoked."
)
CJK_RE = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")


def test_a_chinese_note_counts_at_least_one_token_per_character() -> None:
    cjk = len(CJK_RE.findall(CHINESE_NOTE))
    assert cjk >= 60
    assert estimate_text_tokens(CHINESE_NOTE) >= cjk
    # what admission to the TPM limit charges before the call, max_tokens on top
    assert estimate_tokens([{"role": "user", "content": CHINESE_NOTE}], max_tokens=100) >= cjk + 100


def test_an_english_note_stays_at_characters_over_four() -> None:
    assert estimate_text_tokens(ENGLISH_NOTE) == len(ENGLISH_NOTE) // 4
    messages = [{"role": "system", "content": "Extract."}, {"role": "user", "content": ENGLISH_NOTE}]
    assert estimate_tokens(messages, max_tokens=100) == len("Extract.") // 4 + len(ENGLISH_NOTE) // 4 + 100


def test_accents_and_mixed_text() -> None:
    assert estimate_text_tokens("Café crème brûlée, naïve résumé") == len("Café crème brûlée, naïve résumé") // 4
    # three wide characters (two ideographs and a full-width comma), the rest by four
    assert estimate_text_tokens("血压 BP 140/90，") == 3 + len(" BP 140/90") // 4
    assert estimate_text_tokens("") == 0
