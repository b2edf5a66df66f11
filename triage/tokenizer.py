"""Chinese word segmentation with jieba plus the hotline's own dictionary.

The user dictionary (triage/data/userdict.txt) holds government and service terms and unit names;
the jurisdiction's place names are added at run time from the settings or a policy.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from pathlib import Path

import jieba

USERDICT = Path(__file__).parent / "data" / "userdict.txt"
_lock = threading.Lock()
_tokenizer: jieba.Tokenizer | None = None
_WORD = re.compile(r"[\w\u4e00-\u9fff]")

jieba.setLogLevel(logging.WARNING)


def get_tokenizer() -> jieba.Tokenizer:
    """A process-wide jieba tokenizer with the user dictionary loaded (initialised once, thread-safe)."""
    global _tokenizer
    if _tokenizer is None:
        with _lock:
            if _tokenizer is None:
                tok = jieba.Tokenizer()
                tok.initialize()
                if USERDICT.exists():
                    tok.load_userdict(str(USERDICT))
                _tokenizer = tok
    return _tokenizer


def add_place_names(names: list[str]) -> None:
    """Teach the tokenizer the jurisdiction's place names (towns, villages, streets, estates)."""
    tok = get_tokenizer()
    for name in names:
        if name.strip():
            tok.add_word(name.strip(), freq=2000, tag="ns")
    tokens.cache_clear()


@lru_cache(maxsize=8192)
def tokens(text: str) -> tuple[str, ...]:
    """Words of ``text`` without whitespace or punctuation-only tokens."""
    return tuple(w for w in get_tokenizer().lcut(text) if _WORD.search(w))


def tokenize(text: str) -> list[str]:
    """sklearn-compatible analyzer: ``TfidfVectorizer(analyzer=tokenize)``."""
    return list(tokens(text))
