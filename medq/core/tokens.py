"""A token count for text without a tokenizer: the rate limiter's and the simulator's.

The real count depends on the model's tokenizer, which a worker does not load; an
estimate is enough to admit a call against a tokens-per-minute limit (the real usage
the server reports is charged afterwards).
"""

from __future__ import annotations

import re

# Characters that tokenizers spend about one token each on, or more: CJK ideographs
# (with extensions A-F and the compatibility block), kana, Hangul syllables and jamo,
# CJK punctuation and full-width forms.
_WIDE_RE = re.compile(
    "[\u1100-\u11ff\u2e80-\u2fdf\u3000-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003134f]"
)

CHARS_PER_TOKEN = 4


def estimate_text_tokens(text: str) -> int:
    """About how many tokens ``text`` is: one per CJK (wide) character, one per four
    other characters.

    Why not characters / 4 for all: that is right for English and other Latin-script
    text with BPE tokenizers, but a Chinese, Japanese or Korean character is about one
    token in tokenizers with a large vocabulary (Qwen2.5, Llama 3, Gemma) and up to three
    in byte-level ones trained mostly on English (UTF-8 spends three bytes on it), so
    characters / 4 undercounts a Chinese note four times or more, and a TPM limit would
    admit four times the tokens it allows. Cheap, as it runs per call: ASCII text is one
    C-level check, other text one regex pass.
    """
    if text.isascii():
        return len(text) // CHARS_PER_TOKEN
    narrow = _WIDE_RE.sub("", text)
    return (len(text) - len(narrow)) + len(narrow) // CHARS_PER_TOKEN
