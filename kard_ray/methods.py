"""The method table, written once: which student a method uses, how it finds passages, its name.

The pipeline (which students to train), evaluation (which student to load, which passages to hand it)
and Serve (which methods can be served, the online recipe) all read this table; the config validates
`methods` against it. Per KARD.md §5:

    ft, rd          no retrieval (the student never saw a Knowledge field)
    kard_bm25       top-k retrieved by the question (+ options)
    kard_reranker   top-k* retrieved by the question, reranked, top-k
    kard_oracle     top-k retrieved by a test-time teacher rationale (an upper bound; evaluation only)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Method:
    name: str
    variant: str  # the student it uses: kard / rd / ft (both KARD retrievals share one student)
    retrieval: str  # how results tables name its retrieval
    query: Optional[str]  # what retrieval searches with: "question" (question + options), "oracle_rationale", None
    rerank: bool  # retrieve k* candidates, rerank, keep the top k
    servable: bool  # the online service can run it (it needs only the question)

    @property
    def student(self) -> str:
        """The model directory name under `<run>/models/`."""
        return f"student_{self.variant}"

    def retrieve_depth(self, k: int, k_star: int) -> int:
        """How many passages the first retrieval returns: k*, when a reranker cuts them to k."""
        return k_star if self.rerank else k


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ft", "ft", "none", None, False, False),
    Method("rd", "rd", "none", None, False, False),
    Method("kard_bm25", "kard", "bm25", "question", False, True),
    Method("kard_reranker", "kard", "bm25+reranker", "question", True, True),
    Method("kard_oracle", "kard", "oracle rationale", "oracle_rationale", False, False),
)}
# What a user may list in `methods` (the oracle is added by evaluation when test rationales exist).
CONFIGURABLE = ("ft", "rd", "kard_bm25", "kard_reranker")
SERVABLE = tuple(n for n, m in METHODS.items() if m.servable)


def variants(methods) -> list[str]:
    """The student variants the methods need, in order, each once."""
    out: list[str] = []
    for name in methods:
        v = METHODS[name].variant
        if v not in out:
            out.append(v)
    return out
