"""Text utilities shared by ingest, BM25 and dense retrieval.

* `format_passage`: the one place that decides how a passage reads ("Title . text", as in KARD).
* `split_words`: fixed-size word windows with overlap (the chunker).
* `text_hash`: the exact-duplicate key.
* `BM25Tokenizer`: lower-casing, a token regex that keeps one-character tokens ("5", "B" — the
  bm25s default pattern drops them, RAY_NOTES.md), stopwords and optional Snowball stemming.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable

from kard_ray.config import BM25Config


def format_passage(title: str | None, text: str) -> str:
    """`"{title} . {text}"` — the passage string indexed by BM25, embedded and shown to the student.

    A passage without a title is its text alone (no dangling " . ").
    """
    title = (title or "").strip()
    return f"{title} . {text}" if title else text


def split_words(text: str, words_per_passage: int, overlap_words: int = 0) -> list[str]:
    """Split `text` into windows of `words_per_passage` words, consecutive windows sharing
    `overlap_words` words. Whitespace is normalised to single spaces.

    A remainder shorter than a quarter window is merged into the previous window instead of
    becoming a passage of a few words (such stubs only add noise to retrieval).
    """
    if words_per_passage < 1 or not 0 <= overlap_words < words_per_passage:
        raise ValueError(f"need words_per_passage >= 1 and 0 <= overlap_words < words_per_passage, "
                         f"got {words_per_passage}, {overlap_words}")
    words = text.split()
    if len(words) <= words_per_passage:
        return [" ".join(words)] if words else []
    step = words_per_passage - overlap_words
    starts = list(range(0, len(words) - overlap_words, step))
    # Merge a short tail: it is the words after the last full window.
    min_tail = max(1, words_per_passage // 4)
    if len(starts) > 1 and len(words) - starts[-1] - overlap_words < min_tail:
        starts.pop()
    pieces = []
    for i, s in enumerate(starts):
        end = len(words) if i == len(starts) - 1 else s + words_per_passage
        pieces.append(" ".join(words[s:end]))
    return pieces


def text_hash(text: str) -> str:
    """Exact-duplicate key: blake2b-128 of the whitespace-normalised text (hex)."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).hexdigest()


class BM25Tokenizer:
    """Text -> list of string tokens for BM25 (documents and queries alike).

    Lower-cases, extracts tokens with `cfg.token_pattern` (default `\\b\\w+\\b`: Unicode word
    characters, one-character tokens kept), drops stopwords (bm25s's lists, e.g. `en`), and stems with
    PyStemmer when `cfg.stemmer` names a Snowball language. Picklable (Ray actors, saved indexes).
    """

    def __init__(self, cfg: BM25Config):
        from bm25s.tokenization import _infer_stopwords

        self.pattern = cfg.token_pattern
        self.stopwords_name = cfg.stopwords
        self.stemmer_name = cfg.stemmer
        self._re = re.compile(cfg.token_pattern)
        self.stopwords = frozenset(_infer_stopwords(cfg.stopwords) if cfg.stopwords else [])
        self._stem = None
        if cfg.stemmer:
            try:
                import Stemmer  # PyStemmer
            except ImportError:  # pragma: no cover - depends on the environment
                raise ImportError(f"knowledge.bm25.stemmer={cfg.stemmer!r} needs PyStemmer: pip install PyStemmer") from None
            self._stem = Stemmer.Stemmer(cfg.stemmer).stemWords
        self._stem_cache: dict[str, str] = {}

    def __getstate__(self):
        return {"pattern": self.pattern, "stopwords_name": self.stopwords_name, "stemmer_name": self.stemmer_name}

    def __setstate__(self, state):
        self.__init__(BM25Config(token_pattern=state["pattern"], stopwords=state["stopwords_name"],
                                 stemmer=state["stemmer_name"]))

    def __call__(self, text: str) -> list[str]:
        tokens = [t for t in self._re.findall(text.lower()) if t not in self.stopwords]
        if self._stem is not None:
            cache = self._stem_cache
            missing = [t for t in set(tokens) if t not in cache]
            if missing:
                cache.update(zip(missing, self._stem(missing)))
            tokens = [cache[t] for t in tokens]
        return tokens

    def tokenize_many(self, texts: Iterable[str]) -> list[list[str]]:
        return [self(t) for t in texts]
