"""The reranker at inference: architectures, tokenisation, save/load, `Reranker`, batch `rerank_dataset`.

Two architectures over any HF encoder (name or path):

* `cross_encoder` (default): the question (+ options) and a passage read together,
  `[CLS] query [SEP] passage [SEP]` -> one logit (AutoModelForSequenceClassification, num_labels=1,
  so an exported model is a plain HF sequence-classification directory, and a published
  cross-encoder can be the starting point).
* `late_interaction` (the KARD authors' code, ColBERT-style): one shared encoder reads the query and
  each passage separately; a linear compressor maps token states to `colbert_dim`; the score is the
  sum over query tokens of the maximum dot product over passage tokens, padding masked on both sides
  (raw dot products, as in the authors' code, which found them slightly better than cosine).

Training (`kard_ray.training.reranker`) and inference (`Reranker`, and `rerank_dataset` on Ray Data)
tokenise through the same two functions, `encode_pairs` and `encode_texts`, so a model sees at
inference exactly what it was trained on; `top_k` is the one stable top-k cut.

An exported model directory holds the encoder's `save_pretrained` files, the tokenizer, and
`kard_reranker.json` naming the architecture (and, for late interaction, the compressor weights in
`colbert_linear.safetensors`).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Optional, Sequence

import math

import numpy as np
import pyarrow as pa
import torch

from kard_ray import io
from kard_ray.inference.formats import top_k

META_FILE = "kard_reranker.json"
COLBERT_HEAD_FILE = "colbert_linear.safetensors"
FORMAT_VERSION = 1
ARCHITECTURES = ("cross_encoder", "late_interaction")
# Inputs an HF encoder may take from a tokenizer; anything else a tokenizer returns is dropped.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# ------------------------------------------------------------------------------------------------
# tokenisation (shared by training and inference)


_THREAD = threading.local()


def load_reranker_tokenizer(name_or_path: str):
    """The tokenizer of `name_or_path`, loaded once per thread.

    Per thread because Ray Data runs collate functions in a small thread pool, and a fast tokenizer
    whose truncation/padding settings are changed by two threads at once fails ("Already borrowed").
    """
    from kard_ray.models import load_tokenizer

    cache = getattr(_THREAD, "tokenizers", None)
    if cache is None:
        cache = _THREAD.tokenizers = {}
    if name_or_path not in cache:
        tok = load_tokenizer(name_or_path)
        if tok.pad_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path} has no pad token; a reranker pads candidate batches")
        cache[name_or_path] = tok
    return cache[name_or_path]


def _keep_inputs(enc) -> dict[str, np.ndarray]:
    return {k: np.asarray(enc[k], dtype=np.int64) for k in MODEL_INPUTS if k in enc}


def encode_pairs(tokenizer, queries: Sequence[str], passages: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """Cross-encoder inputs for (query, passage) pairs, padded to the longest, at most `max_length`.

    `longest_first` truncation trims whichever side is longer (the passage, normally), and never
    fails on a long question the way `only_second` would.
    """
    enc = tokenizer(list(queries), list(passages), truncation="longest_first", max_length=max_length,
                    padding=True, return_tensors="np")
    return _keep_inputs(enc)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """Late-interaction inputs for single texts (queries or passages), padded to the longest."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="np")
    return _keep_inputs(enc)


# ------------------------------------------------------------------------------------------------
# architectures


class CrossEncoder(torch.nn.Module):
    """One relevance logit per (query, passage) pair."""

    architecture = "cross_encoder"

    def __init__(self, model):
        super().__init__()
        self.model = model  # an AutoModelForSequenceClassification with num_labels=1

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "CrossEncoder":
        from transformers import AutoModelForSequenceClassification

        from kard_ray.models import model_path

        model = AutoModelForSequenceClassification.from_pretrained(model_path(name_or_path), num_labels=1)
        if model.config.pad_token_id is None:
            # Needed by heads that pool the last non-pad token (decoder-style encoders).
            model.config.pad_token_id = load_reranker_tokenizer(name_or_path).pad_token_id
        return cls(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits[:, 0]

    def gradient_checkpointing_enable(self, **kw) -> None:
        self.model.gradient_checkpointing_enable(**kw)

    def save(self, directory: str) -> dict:
        self.model.save_pretrained(directory)
        return {}


def load_token_encoder(name_or_path: str):
    """An HF encoder for token states only. Its pooler (BERT's [CLS] dense head, present in every
    BERT-family checkpoint: MiniLM, LinkBERT, ...) is dropped: late interaction never uses it, and a
    parameter without a gradient makes DDP fail on the second step ("Expected to have finished
    reduction in the prior iteration ...")."""
    from kard_ray.models import load_encoder

    encoder = load_encoder(name_or_path)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # BertModel.forward skips a None pooler
    return encoder


class LateInteraction(torch.nn.Module):
    """ColBERT-style MaxSim over a shared encoder and a linear compressor."""

    architecture = "late_interaction"

    def __init__(self, encoder, colbert_dim: int):
        super().__init__()
        self.encoder = encoder
        self.compressor = torch.nn.Linear(encoder.config.hidden_size, colbert_dim)

    @classmethod
    def from_pretrained(cls, name_or_path: str, colbert_dim: int) -> "LateInteraction":
        return cls(load_token_encoder(name_or_path), colbert_dim)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token vectors [n, L, colbert_dim]."""
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        return self.compressor(states)

    @staticmethod
    def maxsim(q_vecs: torch.Tensor, q_mask: torch.Tensor, d_vecs: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
        """Scores [n] of n (query, passage) pairs given row-aligned vectors [n, Lq, d] and [n, Ld, d].

        Padding passage tokens never win the max; padding query tokens add nothing to the sum.
        """
        sim = torch.bmm(q_vecs, d_vecs.transpose(1, 2))  # [n, Lq, Ld]
        sim = sim.masked_fill(~d_mask.bool()[:, None, :], torch.finfo(sim.dtype).min)
        best = sim.max(dim=-1).values  # [n, Lq]
        return (best * q_mask.to(best.dtype)).sum(dim=-1)

    def forward(self, q_input_ids: torch.Tensor, q_attention_mask: torch.Tensor, d_input_ids: torch.Tensor,
                d_attention_mask: torch.Tensor, d_query_index: torch.Tensor,
                q_token_type_ids: Optional[torch.Tensor] = None,
                d_token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores [n_docs]: passage i scored against query `d_query_index[i]` (each query encoded once)."""
        q = self.encode(q_input_ids, q_attention_mask, q_token_type_ids)
        d = self.encode(d_input_ids, d_attention_mask, d_token_type_ids)
        return self.maxsim(q[d_query_index], q_attention_mask[d_query_index], d, d_attention_mask)

    def gradient_checkpointing_enable(self, **kw) -> None:
        self.encoder.gradient_checkpointing_enable(**kw)

    def save(self, directory: str) -> dict:
        from safetensors.torch import save_file

        self.encoder.save_pretrained(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.compressor.state_dict().items()}
        save_file(state, os.path.join(directory, COLBERT_HEAD_FILE))
        return {"colbert_dim": self.compressor.out_features, "colbert_head": COLBERT_HEAD_FILE}


def build_reranker(architecture: str, init_model: str, colbert_dim: int = 128) -> torch.nn.Module:
    """A reranker module initialised from an HF encoder (name or path)."""
    if architecture == "cross_encoder":
        return CrossEncoder.from_pretrained(init_model)
    if architecture == "late_interaction":
        return LateInteraction.from_pretrained(init_model, colbert_dim)
    raise ValueError(f"reranker architecture {architecture!r}: expected one of {ARCHITECTURES}")


def save_reranker(model: torch.nn.Module, directory: str, tokenizer, meta: dict) -> None:
    """Write weights, tokenizer and `kard_reranker.json` into a local directory."""
    os.makedirs(directory, exist_ok=True)
    extra = model.save(directory)
    tokenizer.save_pretrained(directory)
    full = {"format_version": FORMAT_VERSION, "architecture": model.architecture, **meta, **extra}
    with open(os.path.join(directory, META_FILE), "w") as fh:
        json.dump(full, fh, indent=2)


def read_meta(model_dir: str) -> dict:
    path = io.join(model_dir, META_FILE)
    if not io.exists(path):
        raise FileNotFoundError(f"{model_dir}: not a kard-ray reranker (no {META_FILE}); train one with train_reranker")
    meta = io.read_json(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    if meta.get("architecture") not in ARCHITECTURES:
        raise ValueError(f"{path}: field 'architecture' is {meta.get('architecture')!r}, "
                         f"expected one of {ARCHITECTURES}")
    return meta


def load_reranker(model_dir: str) -> tuple[torch.nn.Module, dict]:
    """(module in eval mode, meta) from an exported directory (local path; see `Reranker.from_dir` for URIs)."""
    meta = read_meta(model_dir)
    if meta["architecture"] == "cross_encoder":
        model = CrossEncoder.from_pretrained(model_dir)
    else:
        from safetensors.torch import load_file

        model = LateInteraction(load_token_encoder(model_dir), int(meta["colbert_dim"]))
        head = os.path.join(model_dir, meta.get("colbert_head", COLBERT_HEAD_FILE))
        if not os.path.exists(head):
            raise FileNotFoundError(f"{model_dir}: late-interaction reranker without its compressor {head}")
        model.compressor.load_state_dict(load_file(head))
    model.eval()  # transformers 5 builds models in train mode (dropout on)
    return model, meta


# ------------------------------------------------------------------------------------------------
# inference


def _to_torch(arrays: dict[str, np.ndarray], device: torch.device, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


class Reranker:
    """A trained reranker for online and batch use; the model and tokenizer load once.

        rr = Reranker.from_dir(run.model("reranker"))
        scores = rr.rerank("What is the main export of Brax? salt tin", ["Brax . The main export ..."])

    Queries are the question with its options (`kard_ray.inference.formats.question_query`), as in
    training; candidates are passage strings "Title . text" (`kard_ray.knowledge.format_passage`).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, meta: dict, max_length: int = 256,
                 device: str | None = None, pair_batch_size: int = 64, cpu_bf16: bool = False):
        from kard_ray.models import cpu_has_native_bf16

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 autocast on a CPU that computes bf16 natively (`reranker.cpu_bf16`, as in training); fp32 otherwise
        self.autocast = bool(cpu_bf16) and self.device.type == "cpu" and cpu_has_native_bf16()
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.meta = meta
        self.architecture = meta["architecture"]
        self.max_length = int(max_length)
        self.max_query_length = int(meta.get("max_query_length", 64))
        self.pair_batch_size = int(pair_batch_size)

    @classmethod
    def from_dir(cls, model_dir: str, max_length: int = 256, device: str | None = None,
                 pair_batch_size: int = 64, cpu_bf16: bool = False) -> "Reranker":
        """Load an exported reranker from a local directory or a URI (cached locally, see knowledge.store)."""
        from kard_ray.knowledge.store import local_dir
        from kard_ray.models import load_tokenizer

        d = local_dir(model_dir)
        model, meta = load_reranker(d)
        return cls(model, load_tokenizer(d), meta, max_length=max_length, device=device,
                   pair_batch_size=pair_batch_size, cpu_bf16=cpu_bf16)

    def rerank(self, question: str, candidates: list[str]) -> np.ndarray:
        """One float32 score per candidate (higher = more relevant), in the candidates' order."""
        return self.rerank_batch([question], [candidates])[0]

    @torch.inference_mode()
    def rerank_batch(self, questions: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        """Scores per question; all pairs of the batch are scored in chunks of `pair_batch_size`."""
        if len(questions) != len(candidates):
            raise ValueError(f"rerank_batch: {len(questions)} questions but {len(candidates)} candidate lists")
        q_index = np.repeat(np.arange(len(questions)), [len(c) for c in candidates])
        passages = [p for c in candidates for p in c]
        flat = np.zeros(len(passages), dtype=np.float32)
        if passages:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                flat = self._scores(questions, q_index, passages)
        bounds = np.cumsum([0] + [len(c) for c in candidates])
        return [flat[bounds[i]:bounds[i + 1]] for i in range(len(questions))]

    def _scores(self, questions: list[str], q_index: np.ndarray, passages: list[str]) -> np.ndarray:
        if self.architecture == "cross_encoder":
            return self._cross_scores(questions, q_index, passages)
        return self._late_scores(questions, q_index, passages)


    def _cross_scores(self, questions: list[str], q_index: np.ndarray, passages: list[str]) -> np.ndarray:
        out = []
        for s in range(0, len(passages), self.pair_batch_size):
            qs = [questions[i] for i in q_index[s:s + self.pair_batch_size]]
            enc = encode_pairs(self.tokenizer, qs, passages[s:s + self.pair_batch_size], self.max_length)
            out.append(self.model(**_to_torch(enc, self.device)).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def _late_scores(self, questions: list[str], q_index: np.ndarray, passages: list[str]) -> np.ndarray:
        q_enc = _to_torch(encode_texts(self.tokenizer, questions, self.max_query_length), self.device)
        q_vecs = self.model.encode(q_enc["input_ids"], q_enc["attention_mask"], q_enc.get("token_type_ids"))
        out = []
        for s in range(0, len(passages), self.pair_batch_size):
            d_enc = _to_torch(encode_texts(self.tokenizer, passages[s:s + self.pair_batch_size], self.max_length),
                              self.device)
            d_vecs = self.model.encode(d_enc["input_ids"], d_enc["attention_mask"], d_enc.get("token_type_ids"))
            qi = torch.from_numpy(q_index[s:s + self.pair_batch_size]).to(self.device)
            out.append(LateInteraction.maxsim(q_vecs[qi], q_enc["attention_mask"][qi], d_vecs,
                                              d_enc["attention_mask"]).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)



# ------------------------------------------------------------------------------------------------
# batch reranking on Ray Data

PASSAGE_LISTS = ("passage_ids", "passage_titles", "passage_texts")


class RerankBatch:
    """Ray Data actor: one Reranker (loaded once) reorders each row's passage lists and keeps the top k."""

    def __init__(self, model_dir: str, max_length: int, k: int, num_threads: int = 1, cpu_bf16: bool = False):
        torch.set_num_threads(max(1, num_threads))  # a fractional-CPU actor must not spawn a thread per core
        self.reranker = Reranker.from_dir(model_dir, max_length=max_length, cpu_bf16=cpu_bf16)
        self.k = int(k)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from kard_ray.knowledge import format_passage

        for col in ("query", *PASSAGE_LISTS, "passage_scores"):
            if col not in batch.column_names:
                raise KeyError(f"rerank_dataset: no column {col!r} (columns: {batch.column_names}); "
                               "retrieve passages first (kard_ray.knowledge.retrieve)")
        titles = batch.column("passage_titles").to_pylist()
        texts = batch.column("passage_texts").to_pylist()
        cands = [[format_passage(t, x) for t, x in zip(ts or [], xs or [])] for ts, xs in zip(titles, texts)]
        scores = self.reranker.rerank_batch([str(q) for q in batch.column("query").to_pylist()], cands)
        orders = [np.asarray(top_k(s, self.k), np.int64) for s in scores]
        lengths = np.array([len(c) for c in cands], np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        take = pa.array(np.concatenate([starts[i] + o for i, o in enumerate(orders)]).astype(np.int64)
                        if orders else np.zeros(0, np.int64))
        offsets = pa.array(np.concatenate([[0], np.cumsum([len(o) for o in orders])]).astype(np.int32))
        for col in PASSAGE_LISTS:
            values = batch.column(col).combine_chunks().flatten()
            batch = batch.set_column(batch.column_names.index(col), col,
                                     pa.ListArray.from_arrays(offsets, values.take(take)))
        new_scores = np.concatenate([s[o] for s, o in zip(scores, orders)]).astype(np.float32) if orders else []
        return batch.set_column(batch.column_names.index("passage_scores"), "passage_scores",
                                pa.ListArray.from_arrays(offsets, pa.array(new_scores, pa.float32())))


def rerank_dataset(ds, model_dir: str, cfg, k: int, *, batch_size: int = 8, num_gpus: float = 0.0):
    """Rerank retrieved passages: rows with `query` and passage_ids/_scores/_titles/_texts (from
    `kard_ray.knowledge.retrieve`, k* deep) come back with those lists reordered by reranker score and
    cut to the top `k`; passage_scores become the reranker's scores. Other columns pass through.

    Runs on an actor pool of `reranker.num_actors` actors with `reranker.num_cpus_per_actor` CPUs
    (and `num_gpus`) each; every actor loads the model once; `batch_size` questions per call.
    """
    import ray

    if k < 1:
        raise ValueError(f"rerank_dataset: k must be >= 1, got {k}")
    rc = cfg.reranker
    return ds.map_batches(
        RerankBatch, batch_format="pyarrow", batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=rc.num_actors), num_cpus=rc.num_cpus_per_actor, num_gpus=num_gpus,
        fn_constructor_kwargs={"model_dir": model_dir, "max_length": rc.max_length, "k": k,
                               "num_threads": max(1, math.floor(rc.num_cpus_per_actor)), "cpu_bf16": rc.cpu_bf16})


