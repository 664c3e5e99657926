"""Test-time pieces shared by evaluation and Serve (kard_ray.inference): the method table's recipes and
self-consistency sampling that does not depend on what else is in the batch."""

from __future__ import annotations

import pytest

from kard_ray.inference.formats import question_query, top_k
from kard_ray.methods import CONFIGURABLE, METHODS, SERVABLE, variants


def test_method_table_is_the_one_contract():
    assert CONFIGURABLE == ("ft", "rd", "kard_bm25", "kard_reranker")
    assert SERVABLE == ("kard_bm25", "kard_reranker")
    assert variants(["ft", "kard_bm25", "rd", "kard_reranker"]) == ["ft", "kard", "rd"]
    assert METHODS["kard_reranker"].retrieve_depth(k=1, k_star=8) == 8 and METHODS["kard_bm25"].retrieve_depth(1, 8) == 1
    assert {m.student for m in METHODS.values()} == {"student_ft", "student_rd", "student_kard"}
    assert top_k([0.5, 0.9, 0.5, 0.1], 3) == [1, 0, 2]  # ties keep retrieval order
    assert question_query("Q?", ["a", "b"]) == "Q? a b"


@pytest.mark.timeout(300)
def test_sampled_votes_do_not_depend_on_batch_composition(tiny_t5_dir):
    from kard_ray.inference.generator import StudentGenerator, question_key

    gen = StudentGenerator(tiny_t5_dir, "synthetic", max_new_tokens=6, decoding="sample", n_votes=3,
                           temperature=1.5, seed=0, device="cpu")
    qs = [("What is the main export of Brax?", ["salt", "tin"]), ("Which river runs through Dorn?", ["Ul", "Oro"]),
          ("What is the flag of Kelt?", ["red", "blue"])]

    def samples(batch: list[int], g=gen) -> dict[int, list[str]]:
        sources = [g.source(qs[i][0], qs[i][1], None) for i in batch]
        out = g.generate(sources, [question_key(*qs[i]) for i in batch])
        return dict(zip(batch, out))

    full, reordered, alone = samples([0, 1, 2]), samples([2, 0]), samples([1])
    assert all(len(v) == 3 for v in full.values())
    assert full[0] == reordered[0] and full[2] == reordered[2] and full[1] == alone[1]
    assert len({tuple(v) for v in full.values()} | {tuple(full[0])}) >= 2  # real sampling, not one fixed text
    other = StudentGenerator(tiny_t5_dir, "synthetic", max_new_tokens=6, decoding="sample", n_votes=3,
                             temperature=1.5, seed=1, device="cpu")
    assert samples([0, 1, 2], other) != full  # the seed matters
