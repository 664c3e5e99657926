"""Test-time pieces shared by evaluation and Serve (kard_ray.inference): the method table's recipes,
self-consistency sampling that does not depend on what else is in the batch, truncation that is
counted, the token limit the training targets call for, and likelihood (rank-classification) scoring."""

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


def _fit(model_dir: str, out_dir: str, source: str, target: str, steps: int = 40) -> str:
    """The tiny T5 taught one (source, target) pair by plain teacher forcing; saved to out_dir."""
    import torch

    from kard_ray.models import load_seq2seq, load_tokenizer

    tok, model = load_tokenizer(model_dir), load_seq2seq(model_dir)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    enc, lab = tok([source], return_tensors="pt"), tok([target], return_tensors="pt").input_ids
    for _ in range(steps):
        opt.zero_grad()
        model(**enc, labels=lab).loss.backward()
        opt.step()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.mark.timeout(300)
def test_likelihood_scoring_ranks_options_by_the_students_own_loss(tiny_t5_dir, tmp_path):
    import torch

    from kard_ray.inference.formats import encode_sources, format_target
    from kard_ray.inference.generator import StudentGenerator

    q, opts = "What is the main export of Brax?", ["salt", "tin", "wool"]
    probe = StudentGenerator(tiny_t5_dir, "synthetic", max_new_tokens=4, device="cpu")
    source = probe.source(q, opts, ["Brax . Brax exports tin."])
    # KARD: a student taught "... tin.\nAnswer: B" picks B after its own rationale, even from a
    # generation whose answer line was cut off; FT: a student taught "wool\nAnswer: C" picks C.
    kard_dir = _fit(tiny_t5_dir, str(tmp_path / "kard"), source, format_target("Brax exports tin.", "B"))
    kard = StudentGenerator(kard_dir, "synthetic", max_new_tokens=4, score_by="likelihood", device="cpu")
    ids = encode_sources(kard.tokenizer, [source], kard.max_source_length)[0]
    assert kard.likelihood_choice(ids, opts, "Brax exports tin.\nAns") == 1
    # the scores are the model's summed log-likelihood of each whole target (checked against its loss)
    targets = [format_target("Brax exports tin.", letter) for letter in "ABC"]
    scores = kard.option_loglikelihoods(ids, targets)
    for t, sc in zip(targets, scores):
        lab = kard.tokenizer([t], return_tensors="pt").input_ids
        with torch.no_grad():
            loss = kard.model(input_ids=torch.tensor([ids]), labels=lab).loss
        assert abs(-loss.item() * lab.shape[1] - sc) < 1e-3 * max(1.0, abs(sc))
    ft_source = probe.source(q, opts, None)
    ft_dir = _fit(tiny_t5_dir, str(tmp_path / "ft"), ft_source, format_target(None, "C", "wool"))
    ft = StudentGenerator(ft_dir, "synthetic", max_new_tokens=2, score_by="likelihood", device="cpu", variant="ft")
    preds = ft.predict([q, "Which river runs through Dorn?"], [opts, ["Ul", "Oro"]], [None, None])
    assert preds[0].pred_index == 2  # 2 new tokens: no readable answer, yet likelihood answers
    assert all(p.pred_index >= 0 for p in preds)  # every question gets an answer


@pytest.mark.timeout(300)
def test_truncation_is_flagged_and_the_token_limit_comes_from_the_training_targets(tiny_t5_dir, tmp_path):
    import shutil

    import pyarrow as pa

    from kard_ray.evaluation.evaluate import method_metrics, truncation_warning
    from kard_ray.inference.generator import GENERATION_DEFAULTS, StudentGenerator, write_generation_defaults

    from kard_ray.inference.formats import format_target

    q, opts = "What is the main export of Brax?", ["salt", "tin"]
    source = StudentGenerator(tiny_t5_dir, "synthetic", max_new_tokens=2, device="cpu").source(q, opts, None)
    taught = _fit(tiny_t5_dir, str(tmp_path / "taught"), source, format_target("Brax exports tin.", "B"), steps=60)
    short = StudentGenerator(taught, "synthetic", max_new_tokens=3, device="cpu")
    long = StudentGenerator(taught, "synthetic", max_new_tokens=40, device="cpu")
    (cut,), (whole,) = short.predict([q], [opts], [None]), long.predict([q], [opts], [None])
    assert whole.generation == "Brax exports tin.\nAnswer: B" and not whole.truncated  # ended by its EOS
    assert cut.truncated and whole.generation.startswith(cut.generation)
    # null max_new_tokens: the 99th percentile of the targets' lengths + 8, from the model directory
    model_dir = str(tmp_path / "student")
    shutil.copytree(tiny_t5_dir, model_dir)
    with pytest.raises(FileNotFoundError, match="eval.max_new_tokens"):
        StudentGenerator(model_dir, "synthetic", max_new_tokens=None, device="cpu")
    info = write_generation_defaults(model_dir, list(range(1, 101)))
    assert info["target_tokens_p99"] == 100 and info["max_new_tokens"] == 108
    assert (tmp_path / "student" / GENERATION_DEFAULTS).exists()
    assert StudentGenerator(model_dir, "synthetic", max_new_tokens=None, device="cpu").max_new_tokens == 108
    assert StudentGenerator(model_dir, "synthetic", max_new_tokens=7, device="cpu").max_new_tokens == 7
    # the results count truncated and unreadable generations, and warn past 5%
    n = 20
    table = pa.table({"correct": [True] * 10 + [False] * 10, "pred_index": [1] * 10 + [-1] * 10,
                      "pred_letter_index": [1] * 10 + [-1] * 10, "pred_text_index": [-1] * n,
                      "parsed_index": [1] * 10 + [-1] * 10, "answer": [1] * n, "truncated": [False] * 18 + [True] * 2})
    m = method_metrics(table)
    assert (m["truncated"], m["unreadable"], m["answered"], m["parsed_accuracy"]) == (2, 10, 10, 0.5)
    warning = truncation_warning("kard_bm25", m, 40)
    assert warning and "2/20" in warning and "eval.max_new_tokens=40" in warning
    assert truncation_warning("kard_bm25", dict(m, truncated=1), 40) is None


@pytest.mark.parametrize("n", [1, 60, 100, 240, 300])
def test_wilson_interval_holds_a_perfect_or_zero_score_and_the_chart_draws_it(n):
    """At 100% (or 0%) the interval's bound must be the score itself: rounding once put it a hair inside
    (0.9999999999999999 for n=100), the chart's error bar went negative and a run that scored 100% failed."""
    from kard_ray.evaluation.evaluate import bar_chart, wilson_interval

    lo, hi = wilson_interval(n, n)
    assert lo < 1.0 and hi == 1.0
    lo, hi = wilson_interval(0, n)
    assert lo == 0.0 and hi > 0.0
    for c in range(0, n + 1, max(1, n // 7)):
        lo, hi = wilson_interval(c, n)
        assert 0.0 <= lo <= c / n <= hi <= 1.0
    methods = {m: {"accuracy": a, "ci95": list(wilson_interval(round(a * n), n))}
               for m, a in (("ft", 0.0), ("kard_reranker", 1.0))}
    assert bar_chart({"methods": methods})[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------
# the generator's dynamic batching (kard_ray.inference.batching): what the Serve Generator and the bench batch with
def _batcher_run(scenario, max_batch_size: int = 4, wait_s: float = 0.2, gen_s: float = 0.1):
    """Runs `scenario(batcher)` against a batcher whose generate() takes `gen_s`; returns (its result, batches)."""
    import asyncio

    from kard_ray.inference.batching import DynamicBatcher

    batches: list[list] = []

    async def generate(items):
        batches.append(list(items))
        await asyncio.sleep(gen_s)
        if "boom" in items:
            raise ValueError("bad item")
        return [f"out:{it}" for it in items]

    async def main():
        b = DynamicBatcher(generate, max_batch_size, wait_s)
        try:
            return await scenario(b)
        finally:
            b.close()

    return asyncio.run(main()), batches


def test_batcher_a_lone_request_does_not_wait_and_company_on_its_way_shares_a_batch():
    import asyncio
    import time

    async def lone(b):
        t0 = time.perf_counter()
        out = await b.submit("a", behind=0)
        return out, time.perf_counter() - t0

    (out, took), batches = _batcher_run(lone, wait_s=2.0)
    assert out == "out:a" and batches == [["a"]]
    assert took < 0.5  # not the 2 s window: nothing was on its way

    async def staggered(b):  # the first says two more are coming; they arrive 50 ms apart
        async def later(item, delay, behind):
            await asyncio.sleep(delay)
            return await b.submit(item, behind)
        return await asyncio.gather(later("a", 0, 2), later("b", 0.05, 1), later("c", 0.1, 0))

    outs, batches = _batcher_run(staggered, wait_s=2.0)
    assert outs == ["out:a", "out:b", "out:c"]
    assert batches == [["a", "b", "c"]]  # the last one, with none behind it, closed the batch before the 2 s


def test_batcher_forms_the_next_batch_when_the_generator_is_free_not_before():
    """What @serve.batch does not do: items arriving while a batch generates all join the next batch."""
    import asyncio

    async def busy(b):
        first = asyncio.ensure_future(b.submit("a", 0))
        await asyncio.sleep(0.02)  # "a" is generating (0.3 s)
        rest = []
        for i, item in enumerate("bcdef"):  # arrive 40 ms apart during that generation, each with more behind
            rest.append(asyncio.ensure_future(b.submit(item, 1)))
            await asyncio.sleep(0.04)
        return await asyncio.gather(first, *rest)

    outs, batches = _batcher_run(busy, max_batch_size=4, wait_s=0.05, gen_s=0.3)
    assert outs == [f"out:{x}" for x in "abcdef"]
    assert batches == [["a"], ["b", "c", "d", "e"], ["f"]]  # full at 4; not b alone then c..f split by windows


def test_batcher_fails_every_caller_of_a_failed_batch_drops_cancelled_ones_and_keeps_serving():
    import asyncio

    async def scenario(b):
        blocker = asyncio.ensure_future(b.submit("x", 0))
        await asyncio.sleep(0.01)
        doomed = asyncio.ensure_future(b.submit("gone", 1))  # queued behind "x", then its caller leaves
        together = [asyncio.ensure_future(b.submit(i, 1)) for i in ("ok", "boom")]
        await asyncio.sleep(0.01)
        doomed.cancel()
        results = await asyncio.gather(blocker, *together, return_exceptions=True)
        after = await b.submit("after", 0)  # the loop survived the failed batch
        return results, after

    (results, after), batches = _batcher_run(scenario, wait_s=0.0)
    assert results[0] == "out:x"
    assert all(isinstance(r, ValueError) for r in results[1:]), results  # both callers of the failed batch
    assert after == "out:after"
    assert ["gone"] not in batches and not any("gone" in bt for bt in batches), batches
