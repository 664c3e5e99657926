"""Neural reranker distillation (KARD.md §4): mine candidates, then train on the trainer core.

At inference only the question exists; the passages it retrieves are often not the ones its rationale
needs. The reranker learns, from the question (+ options) alone, to score candidates the way BM25
with the unseen rationale would:

    path = mine_candidates(cfg, run)                 # Ray Data: candidates + silver scores (reranker_mining)
    result = train_reranker(cfg, run, init_model)    # core.train -> run.model("reranker")

The trained model is used through `kard_ray.inference.reranker` (`Reranker.from_dir`, `rerank_dataset`)
and measured by `kard_ray.evaluation.reranker` (Hits@k of the silver passage).

Training step (one `TrainTask` on `kard_ray.training.core`, the same loop, strategies, checkpoints
and export as the student): the collate function tokenises each example's whole candidate pool (in
Ray Data's prefetch thread; for the bi-encoder it looks up the frozen vectors `embed_candidates`
computed once, before training, instead of tokenising passages); the loss function then samples `n_from_rationale` candidates from the
rationale's top-K and `n_from_question` from the question's top-K (distinct passages; topped up from
the rest of the pool when the lists overlap) with an RNG keyed by (seed, step, example), so a resumed
run samples exactly what an uninterrupted one would, and scores only those. Loss over the sampled
candidates (`reranker.loss`):

    kl: KL( softmax(silver / tau_silver) || softmax(score / tau_model) )      (the paper)
    ce: cross-entropy of softmax(score / tau_model) to the best-silver candidate  (the authors' code)

tau_model is fixed, or (`tau_anneal`) decreases linearly to `tau_min` > 0 over the run — the
authors' schedule could go negative; this one never goes below its floor.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from kard_ray import io
from kard_ray.config import KardConfig, RerankerConfig
from kard_ray.console import say
from kard_ray.io import RunDir
from kard_ray.inference.reranker import (
    ARCHITECTURES, build_reranker, encode_pairs, encode_texts, load_reranker_tokenizer, save_reranker, standardise)
from kard_ray.knowledge import format_passage
from kard_ray.training.core import TrainTask, make_plan, ordered, train, tree_digest
from kard_ray.training.lora import apply_lora, lora_settings, merge_lora
from kard_ray.training.reranker_mining import EXAMPLES_SCHEMA, mine_candidates

__all__ = ["EXAMPLES_SCHEMA", "listwise_loss", "mine_candidates", "reranker_task", "sample_candidates",
           "tau_model_at", "train_reranker"]

TRAIN_COLUMNS = ["question_id", "sample", "query", "candidate_ids", "candidate_titles", "candidate_texts", "silver",
                 "from_rationale", "from_question", "question_scores"]
# what each architecture reads: the bi-encoder looks its passages up by id (`embed_candidates`), and with
# K = 100 the texts are most of the table's bytes (1.4 GB for StrategyQA's 11,882 examples)
NO_TEXTS = ("candidate_titles", "candidate_texts")


def train_columns(architecture: str) -> list[str]:
    return [c for c in TRAIN_COLUMNS if architecture != "bi_encoder" or c not in NO_TEXTS]
_MASKED = -1e9  # finite "minus infinity": exp() underflows to 0 without inf - inf = nan in gradients


# ------------------------------------------------------------------------------------------------
# losses, temperatures, sampling


def tau_model_at(cfg: RerankerConfig, step: int, total_steps: int) -> float:
    """The model temperature at `step`: fixed, or linear from tau_model down to tau_min (never below)."""
    if not cfg.tau_anneal or cfg.tau_model <= cfg.tau_min:
        return cfg.tau_model
    frac = min(max(step, 0) / max(total_steps, 1), 1.0)
    return max(cfg.tau_min, cfg.tau_model - (cfg.tau_model - cfg.tau_min) * frac)


def listwise_loss(scores: torch.Tensor, silver: torch.Tensor, mask: torch.Tensor, kind: str,
                  tau_silver: float, tau_model: float) -> torch.Tensor:
    """Mean over examples of the listwise loss on [B, n] scores; `mask` marks real candidates.

    kl: sum_i p_i (log p_i - log q_i), p = softmax(silver / tau_silver), q = softmax(scores / tau_model)
    ce: -log q_best, best = argmax of silver among the candidates
    """
    mask = mask.bool()
    logits = (scores.float() / tau_model).masked_fill(~mask, _MASKED)
    log_q = torch.log_softmax(logits, dim=-1)
    if kind == "kl":
        target = (silver.float() / tau_silver).masked_fill(~mask, _MASKED)
        log_p = torch.log_softmax(target, dim=-1)
        per = (log_p.exp() * torch.where(mask, log_p - log_q, torch.zeros_like(log_q))).sum(dim=-1)
    elif kind == "ce":
        best = silver.float().masked_fill(~mask, _MASKED).argmax(dim=-1)
        per = -log_q.gather(1, best[:, None]).squeeze(1)
    else:
        raise ValueError(f"reranker loss {kind!r}: expected 'kl' or 'ce'")
    return per.mean()


def sample_candidates(from_rationale: np.ndarray, from_question: np.ndarray, n_rationale: int, n_question: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Pool positions for one training step: `n_rationale` from the rationale's list, `n_question` from the
    question's (excluding those already drawn), topped up from the rest of the pool when a list runs
    short, so the step sees `n_rationale + n_question` distinct passages whenever the pool has them."""
    pool = len(from_rationale)
    r_idx = np.flatnonzero(from_rationale)
    chosen = rng.choice(r_idx, size=min(n_rationale, len(r_idx)), replace=False) if len(r_idx) else r_idx
    q_idx = np.setdiff1d(np.flatnonzero(from_question), chosen)
    if len(q_idx):
        chosen = np.concatenate([chosen, rng.choice(q_idx, size=min(n_question, len(q_idx)), replace=False)])
    short = n_rationale + n_question - len(chosen)
    if short > 0:
        rest = np.setdiff1d(np.arange(pool), chosen)
        if len(rest):
            chosen = np.concatenate([chosen, rng.choice(rest, size=min(short, len(rest)), replace=False)])
    return chosen.astype(np.int64)


def example_key(question_id: str, sample: int) -> int:
    """A 63-bit key of an example: seeds its candidate sampling independently of batch composition."""
    digest = hashlib.blake2b(f"{question_id}\x1f{int(sample)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# ------------------------------------------------------------------------------------------------
# the TrainTask


class RerankCollate:
    """Numpy rows of reranker examples -> tensors of every candidate of every example.

    Example-level: silver, question_scores, pool_mask, from_rationale, from_question ([B, P], P = largest
    pool), pool_size and key ([B]). Cross-encoder: (query, passage) pairs `input_ids` etc. [T, L],
    example-major (T = sum of pool sizes). Late interaction: `q_*` [B, Lq] and passages `d_*` [T, L].
    Bi-encoder: `q_*` and the passages' frozen vectors `d_vectors` [T, h], read from `vectors_path`
    (`embed_candidates`).
    """

    def __init__(self, tokenizer_path: str, architecture: str, max_length: int, max_query_length: int,
                 vectors_path: Optional[str] = None):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"reranker architecture {architecture!r}: expected one of {ARCHITECTURES}")
        if architecture == "bi_encoder" and not vectors_path:
            raise ValueError("a bi-encoder reranker trains on precomputed passage vectors: pass vectors_path")
        self.tokenizer_path, self.architecture = tokenizer_path, architecture
        self.max_length, self.max_query_length = max_length, max_query_length
        self.vectors_path, self._vectors = vectors_path, None

    def passage_vectors(self, ids: list[str]) -> np.ndarray:
        """[len(ids), h] frozen passage vectors, loaded once per process."""
        if self._vectors is None:
            table = io.read_table(self.vectors_path)
            col = table.column("vector").combine_chunks()
            matrix = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
            self._vectors = ({pid: i for i, pid in enumerate(table.column("id").to_pylist())}, matrix)
        row, matrix = self._vectors
        missing = [pid for pid in ids if pid not in row]
        if missing:
            raise KeyError(f"{self.vectors_path}: no vector for candidate {missing[0]!r}; the examples changed "
                           "after the vectors were computed")
        return matrix[[row[pid] for pid in ids]]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tok = load_reranker_tokenizer(self.tokenizer_path)
        queries = [str(q) for q in batch["query"]]
        sizes = np.array([len(x) for x in batch["silver"]], dtype=np.int64)
        b, p = len(queries), int(sizes.max())
        silver, q_scores = np.zeros((b, p), np.float32), np.zeros((b, p), np.float32)
        mask, from_r, from_q = (np.zeros((b, p), bool) for _ in range(3))
        passages, ids = [], []
        for i in range(b):
            n = sizes[i]
            silver[i, :n] = np.asarray(batch["silver"][i], np.float32)
            q_scores[i, :n] = np.asarray(batch["question_scores"][i], np.float32)
            ids += [str(x) for x in batch["candidate_ids"][i]]
            mask[i, :n] = True
            from_r[i, :n] = np.asarray(batch["from_rationale"][i], bool)
            from_q[i, :n] = np.asarray(batch["from_question"][i], bool)
            if self.architecture != "bi_encoder":
                passages += [format_passage(t, x)
                             for t, x in zip(batch["candidate_titles"][i], batch["candidate_texts"][i])]
        keys = np.array([example_key(q, s) for q, s in zip(batch["question_id"], batch["sample"])], np.int64)
        out = {"silver": silver, "question_scores": q_scores, "pool_mask": mask, "from_rationale": from_r,
               "from_question": from_q, "pool_size": sizes, "key": keys}
        if self.architecture == "cross_encoder":
            out.update(encode_pairs(tok, np.repeat(queries, sizes).tolist(), passages, self.max_length))
        else:
            out.update({f"q_{k}": v for k, v in encode_texts(tok, queries, self.max_query_length).items()})
            if self.architecture == "bi_encoder":
                out["d_vectors"] = self.passage_vectors(ids)
            else:
                out.update({f"d_{k}": v for k, v in encode_texts(tok, passages, self.max_length).items()})
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def _trim(t: torch.Tensor, length: int) -> torch.Tensor:
    return t[:, :length]


class RerankerLoss:
    """loss_fn(model, batch, step): sample candidates per example, score them, listwise loss."""

    def __init__(self, cfg: RerankerConfig, total_steps: int, seed: int):
        self.architecture, self.kind = cfg.architecture, cfg.loss
        self.n_r, self.n_q = cfg.n_from_rationale, cfg.n_from_question
        self.tau_silver = cfg.tau_silver
        self.cfg, self.total_steps, self.seed = cfg, total_steps, seed

    def select(self, batch: dict[str, torch.Tensor], step: int) -> np.ndarray:
        """[B, n] pool positions of the step's candidates, -1 where an example has fewer."""
        from_r = batch["from_rationale"].cpu().numpy()
        from_q = batch["from_question"].cpu().numpy()
        sizes = batch["pool_size"].cpu().numpy()
        keys = batch["key"].cpu().numpy()
        n = self.n_r + self.n_q
        slots = np.full((len(sizes), n), -1, np.int64)
        for i, size in enumerate(sizes):
            rng = np.random.default_rng([self.seed, int(step), int(keys[i])])
            chosen = sample_candidates(from_r[i, :size], from_q[i, :size], self.n_r, self.n_q, rng)
            slots[i, :len(chosen)] = chosen
        return slots

    @staticmethod
    def _bi_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], slots: np.ndarray, valid: np.ndarray,
                   rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bi-encoder scores of the selected candidates; their retrieval scores are standardised over each
        example's selection, as inference standardises over the retrieved list."""
        device = batch["silver"].device
        first_stage = torch.gather(batch["question_scores"], 1, torch.from_numpy(np.maximum(slots, 0)).to(device))
        valid_t = torch.from_numpy(valid).to(device)
        kw = {"q_input_ids": batch["q_input_ids"], "q_attention_mask": batch["q_attention_mask"],
              "d_vectors": batch["d_vectors"][rows], "d_query_index": torch.from_numpy(np.nonzero(valid)[0]).to(device),
              "d_retrieval": standardise(first_stage, valid_t)[valid_t]}
        if "q_token_type_ids" in batch:
            kw["q_token_type_ids"] = batch["q_token_type_ids"]
        return model(**kw), batch["q_attention_mask"].sum()

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int):
        slots = self.select(batch, step)
        valid = slots >= 0
        offsets = np.concatenate([[0], np.cumsum(batch["pool_size"].cpu().numpy())[:-1]])
        pair_rows = (offsets[:, None] + slots)[valid]  # rows of the flattened pool, example-major
        device = batch["silver"].device
        rows = torch.from_numpy(pair_rows).to(device)
        if self.architecture == "cross_encoder":
            mask = batch["attention_mask"][rows]
            length = int(mask.sum(dim=1).max())
            kw = {"input_ids": _trim(batch["input_ids"][rows], length), "attention_mask": _trim(mask, length)}
            if "token_type_ids" in batch:
                kw["token_type_ids"] = _trim(batch["token_type_ids"][rows], length)
            flat = model(**kw)
            n_tokens = kw["attention_mask"].sum()
        elif self.architecture == "bi_encoder":
            flat, n_tokens = self._bi_scores(model, batch, slots, valid, rows)
        else:
            d_mask = batch["d_attention_mask"][rows]
            length = int(d_mask.sum(dim=1).max())
            kw = {"q_input_ids": batch["q_input_ids"], "q_attention_mask": batch["q_attention_mask"],
                  "d_input_ids": _trim(batch["d_input_ids"][rows], length), "d_attention_mask": _trim(d_mask, length),
                  "d_query_index": torch.from_numpy(np.nonzero(valid)[0]).to(device)}
            if "q_token_type_ids" in batch:
                kw["q_token_type_ids"] = batch["q_token_type_ids"]
                kw["d_token_type_ids"] = _trim(batch["d_token_type_ids"][rows], length)
            flat = model(**kw)
            n_tokens = kw["d_attention_mask"].sum() + batch["q_attention_mask"].sum()
        valid_t = torch.from_numpy(valid).to(device)
        scores = torch.zeros(valid.shape, dtype=flat.dtype, device=device)
        scores = scores.masked_scatter(valid_t, flat)  # row-major, the order of pair_rows
        silver = torch.gather(batch["silver"], 1, torch.from_numpy(np.maximum(slots, 0)).to(device))
        tau_m = tau_model_at(self.cfg, step, self.total_steps)
        return listwise_loss(scores, silver, valid_t, self.kind, self.tau_silver, tau_m), n_tokens


# peft task type of the HF model inside each architecture: a cross-encoder's classifier head trains
# fully (peft's modules_to_save); late interaction's compressor sits outside the adapted encoder.
LORA_TASK = {"cross_encoder": ("model", "SEQ_CLS"), "late_interaction": ("encoder", "FEATURE_EXTRACTION"),
             "bi_encoder": ("encoder", "FEATURE_EXTRACTION")}


class RerankerBuild:
    def __call__(self, model_config: dict) -> torch.nn.Module:
        model = build_reranker(model_config["architecture"], model_config["init_model"], model_config["colbert_dim"],
                               model_config.get("retrieval_weight"), model_config.get("bi_scale", 20.0))
        if model_config.get("lora"):
            attr, task_type = LORA_TASK[model.architecture]
            setattr(model, attr, apply_lora(getattr(model, attr), model_config["lora"], task_type))
        return model


class RerankerExport:
    """Weights (LoRA adapters merged in) + tokenizer + kard_reranker.json (architecture, lengths, training settings)."""

    def __init__(self, tokenizer_path: str, meta: dict):
        self.tokenizer_path, self.meta = tokenizer_path, meta

    def __call__(self, model: torch.nn.Module, directory: str) -> None:
        save_reranker(merge_lora(model), directory, load_reranker_tokenizer(self.tokenizer_path), self.meta)


def reranker_task(cfg: RerankerConfig, init_model: str, total_steps: int, seed: int,
                  vectors_path: Optional[str] = None) -> TrainTask:
    meta = {"init_model": init_model, "max_length": cfg.max_length, "max_query_length": cfg.max_query_length,
            "loss": cfg.loss, "query": "question + options (kard_ray.inference.formats.question_query)",
            "passage": "Title . text (kard_ray.knowledge.format_passage)"}
    load_reranker_tokenizer(init_model)  # fail here, not inside a worker, when the tokenizer is unusable
    return TrainTask(build_model=RerankerBuild(), loss_fn=RerankerLoss(cfg, total_steps, seed),
                     collate_fn=RerankCollate(init_model, cfg.architecture, cfg.max_length, cfg.max_query_length,
                                              vectors_path),
                     export_fn=RerankerExport(init_model, meta))


# ------------------------------------------------------------------------------------------------
# training


def reranker_dataset(cfg: KardConfig, run: RunDir):
    """The mined examples (`mine_candidates`, the pipeline's `mine` stage), shuffled once and materialised."""
    import ray

    if not io.exists(run.examples("reranker")):
        raise FileNotFoundError(f"{run.examples('reranker')}: no mined reranker examples (run the `mine` stage, "
                                "or kard_ray.training.reranker_mining.mine_candidates, first)")
    columns = train_columns(cfg.reranker.architecture)
    have = io.read_schema(run.examples("reranker")).names
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(f"{run.examples('reranker')}: no column {missing[0]!r}; these examples were mined by an "
                         "older kard-ray: mine again (python jobs/distill.py --from-stage mine ...)")
    ds = ordered(ray.data.read_parquet(run.examples("reranker"), file_extensions=["parquet"]).select_columns(columns))
    return ordered(ds.random_shuffle(seed=cfg.seed)).materialize()


class EmbedPassages:
    """Ray Data actor: a bi-encoder's frozen passage side, which is its starting encoder under mean pooling —
    the dense layer's `Encoder` (the same tokenisation, pooling and bf16 autocast as `Reranker` at inference)."""

    def __init__(self, init_model: str, max_length: int, num_threads: int, cpu_bf16: bool):
        from kard_ray.knowledge.dense import Encoder

        self.encoder = Encoder(init_model, "mean", max_length, num_threads=num_threads, cpu_bf16=cpu_bf16)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [format_passage(t, x)
                 for t, x in zip(batch.column("title").to_pylist(), batch.column("text").to_pylist())]
        vectors = self.encoder.encode(texts)
        return pa.table({"id": batch.column("id"),
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])})


def embed_candidates(cfg: KardConfig, run: RunDir, init_model: str) -> str:
    """Embed every distinct mined candidate once with the bi-encoder's frozen passage encoder (an actor pool of
    `reranker.num_actors`); returns the parquet path of {id, vector}. Recomputed whenever the reranker trains,
    so the vectors always come from this init model, these lengths and these examples."""
    import ray

    rc = cfg.reranker
    table = io.read_table(run.examples("reranker"), columns=["candidate_ids", "candidate_titles", "candidate_texts"])
    seen, rows = set(), {"id": [], "title": [], "text": []}
    for ids, titles, texts in zip(*(table.column(c).to_pylist() for c in table.column_names)):
        for pid, title, text in zip(ids, titles, texts):
            if pid not in seen:
                seen.add(pid)
                rows["id"].append(pid), rows["title"].append(title), rows["text"].append(text)
    out = run.examples("reranker_passage_vectors")
    if io.exists(out):
        io.remove(out)
    ds = ray.data.from_arrow(pa.table(rows)).repartition(max(1, 4 * rc.num_actors)).map_batches(
        EmbedPassages, batch_format="pyarrow", batch_size=256, compute=ray.data.ActorPoolStrategy(size=rc.num_actors),
        num_cpus=rc.num_cpus_per_actor, fn_constructor_kwargs={
            "init_model": init_model, "max_length": rc.max_length,
            "num_threads": max(1, math.floor(rc.num_cpus_per_actor)), "cpu_bf16": rc.cpu_bf16})
    ds.write_parquet(out if io.is_uri(out) else io.resolve(out)[1])
    say(f"[reranker] embedded {len(seen)} distinct candidate passages with the frozen passage encoder -> {out}")
    return out


def train_reranker(cfg: KardConfig, run: RunDir, init_model: str, *, resume: bool = True,
                   fail_at_step: Optional[int] = None) -> dict:
    """Train on the mined examples with the core and export to run.model("reranker").

    init_model: HF encoder name or local/URI path with its tokenizer (for `reranker.model: tiny` the
    pipeline first saves one with `kard_ray.models.save_tiny_model`). Returns the core's result
    ({"steps", "final_loss", "loss_curve", "samples_per_s", ...}) plus "examples" and "model_dir".
    """
    rc = cfg.reranker
    if init_model == "tiny":
        raise ValueError("init_model='tiny': build it first (kard_ray.models.save_tiny_model) and pass its path")
    ds = reranker_dataset(cfg, run)
    n_rows = ds.count()
    model_config = {"init_model": init_model, "architecture": rc.architecture, "colbert_dim": rc.colbert_dim}
    vectors_path = None
    if rc.architecture == "bi_encoder":
        model_config.update({"retrieval_weight": rc.retrieval_weight, "bi_scale": rc.bi_scale})
        vectors_path = embed_candidates(cfg, run, init_model)
    if rc.lora.r:
        model_config["lora"] = lora_settings(rc.lora)
    plan = make_plan(rc, n_rows, model_config)
    task = reranker_task(rc, init_model, plan.total_steps, cfg.seed, vectors_path)
    out = run.model("reranker")
    result = train(task, ds, rc, output_dir=out, storage_path=cfg.resources.storage_path or run.checkpoints,
                   name="reranker", model_config=model_config, seed=cfg.seed, resume=resume, fail_at_step=fail_at_step,
                   data_digest=tree_digest(run.examples("reranker")))
    result.update({"examples": n_rows, "model_dir": out, "architecture": rc.architecture, "loss": rc.loss})
    return result


