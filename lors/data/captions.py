"""Caption normalisation exactly as the reference (BLIP's `pre_caption`, method.md 7.2).

Every caption is normalised once, in prepare, so the text encoder, the cache hash and the
nearest-caption decoding all see the same string.
"""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int = 30) -> str:
    """Lowercase, blank out . ! " ( ) * # : ; ~, collapse whitespace runs, keep `max_words` words."""
    caption = _PUNCTUATION.sub(" ", text.lower())
    caption = _WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
