"""The reranker at inference: architectures, tokenisation, save/load, `Reranker`, batch `rerank_dataset`.

Three architectures over any HF encoder (name or path):

* `cross_encoder` (default): the question (+ options) and a passage read together,
  `[CLS] query [SEP] passage [SEP]` -> one logit (AutoModelForSequenceClassification, num_labels=1,
  so an exported model is a plain HF sequence-classification directory, and a published
  cross-encoder can be the starting point).
* `late_interaction` (the KARD authors' code, ColBERT-style): one shared encoder reads the query and
  each passage separately; a linear compressor maps token states to `colbert_dim`; the score is the
  sum over query tokens of the maximum dot product over passage tokens, padding masked on both sides
  (raw dot products, as in the authors' code, which found them slightly better than cosine).
* `bi_encoder`: a trained query encoder against a frozen copy of the starting encoder for passages
  (mean-pooled, L2-normalised): score = bi_scale * cos(query, passage), plus, with a `retrieval_weight`,
  that weight * the first-stage retrieval score standardised over the candidate list (`standardise`).
  The frozen passage side lets training embed every candidate once, so thousands of question-side
  steps fit on a CPU; the retrieval term lets the model learn what to add to BM25's order instead of
  replacing it. `Reranker` keeps the passage vectors it computed (an LRU by passage string).

Training (`kard_ray.training.reranker`) and inference (`Reranker`, and `rerank_dataset` on Ray Data)
tokenise through the same two functions, `encode_pairs` and `encode_texts`, so a model sees at
inference exactly what it was trained on; `top_k` is the one stable top-k cut.

An exported model directory holds the encoder's `save_pretrained` files, the tokenizer, and
`kard_reranker.json` naming the architecture (and, for late interaction, the compressor weights in
`colbert_linear.safetensors`; for the bi-encoder, the frozen passage encoder in `passage_encoder/` and
the two scalars in `bi_encoder_head.safetensors`).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import math

import numpy as np
import pyarrow as pa
import torch

from kard_ray import io
from kard_ray.inference.formats import top_k
from kard_ray.knowledge.dense import mean_pool

META_FILE = "kard_reranker.json"
COLBERT_HEAD_FILE = "colbert_linear.safetensors"
BI_HEAD_FILE = "bi_encoder_head.safetensors"
PASSAGE_ENCODER_DIR = "passage_encoder"
FORMAT_VERSION = 1
ARCHITECTURES = ("cross_encoder", "late_interaction", "bi_encoder")
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


def standardise(scores: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """First-stage scores made comparable across questions: per row of [B, n], minus the mean over the
    row's real candidates (`mask`), over their standard deviation (1 when they are all equal); padding
    positions come back 0. Training and inference both call this, over the same candidate lists."""
    scores = scores.float()
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    n = mask.sum(dim=-1, keepdim=True).clamp(min=1)
    mean = (scores * mask).sum(dim=-1, keepdim=True) / n
    var = (((scores - mean) * mask) ** 2).sum(dim=-1, keepdim=True) / n
    std = var.sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return torch.where(mask, (scores - mean) / std, torch.zeros_like(scores))


class BiEncoder(torch.nn.Module):
    """A trained query encoder, a frozen passage encoder, a fixed scale on their cosine and (optionally) a
    fixed weight on the standardised retrieval score."""

    architecture = "bi_encoder"

    def __init__(self, encoder, passage_encoder, retrieval_weight: Optional[float], scale: float = 20.0):
        super().__init__()
        self.encoder = encoder
        self.passage_encoder = passage_encoder.requires_grad_(False)
        # Both scalars are settings, not weights (`reranker.bi_scale`, `reranker.retrieval_weight`): learned at
        # the encoder's lr they barely move, and on StrategyQA learning them at a higher lr did not help.
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.uses_retrieval = retrieval_weight is not None
        self.register_buffer("retrieval_weight", torch.tensor(float(retrieval_weight or 0.0)))

    @classmethod
    def from_pretrained(cls, name_or_path: str, retrieval_weight: Optional[float], scale: float) -> "BiEncoder":
        return cls(load_token_encoder(name_or_path), load_token_encoder(name_or_path), retrieval_weight, scale)

    def train(self, mode: bool = True) -> "BiEncoder":
        super().train(mode)
        self.passage_encoder.eval()  # frozen: no dropout, so stored passage vectors stay exact
        return self

    def encode_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return mean_pool(self.encoder, input_ids, attention_mask, token_type_ids)

    @torch.no_grad()
    def encode_passages(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return mean_pool(self.passage_encoder, input_ids, attention_mask, token_type_ids)

    def combine(self, q_vecs: torch.Tensor, d_vectors: torch.Tensor, d_query_index: torch.Tensor,
                d_retrieval: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores [n_docs] from query vectors [B, h], passage vectors [n_docs, h] and, when the model uses
        them, the passages' standardised retrieval scores [n_docs]."""
        scores = self.scale * (q_vecs[d_query_index] * d_vectors.float()).sum(dim=-1)
        if self.uses_retrieval:
            if d_retrieval is None:
                raise ValueError("this bi-encoder reranker adds the retrieval score: pass the candidates' scores")
            scores = scores + self.retrieval_weight * d_retrieval.float()
        return scores

    def forward(self, q_input_ids: torch.Tensor, q_attention_mask: torch.Tensor, d_vectors: torch.Tensor,
                d_query_index: torch.Tensor, d_retrieval: Optional[torch.Tensor] = None,
                q_token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = self.encode_queries(q_input_ids, q_attention_mask, q_token_type_ids)
        return self.combine(q, d_vectors, d_query_index, d_retrieval)

    def gradient_checkpointing_enable(self, **kw) -> None:
        self.encoder.gradient_checkpointing_enable(**kw)

    def save(self, directory: str) -> dict:
        from safetensors.torch import save_file

        self.encoder.save_pretrained(directory)
        self.passage_encoder.save_pretrained(os.path.join(directory, PASSAGE_ENCODER_DIR))
        save_file({"scale": self.scale.detach().cpu().reshape(1).contiguous(),
                   "retrieval_weight": self.retrieval_weight.detach().cpu().reshape(1).contiguous()},
                  os.path.join(directory, BI_HEAD_FILE))
        return {"bi_head": BI_HEAD_FILE, "passage_encoder": PASSAGE_ENCODER_DIR,
                "uses_retrieval": self.uses_retrieval}


def build_reranker(architecture: str, init_model: str, colbert_dim: int = 128,
                   retrieval_weight: Optional[float] = None, bi_scale: float = 20.0) -> torch.nn.Module:
    """A reranker module initialised from an HF encoder (name or path)."""
    if architecture == "cross_encoder":
        return CrossEncoder.from_pretrained(init_model)
    if architecture == "late_interaction":
        return LateInteraction.from_pretrained(init_model, colbert_dim)
    if architecture == "bi_encoder":
        return BiEncoder.from_pretrained(init_model, retrieval_weight, bi_scale)
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
    elif meta["architecture"] == "bi_encoder":
        model = _load_bi_encoder(model_dir, meta)
    else:
        from safetensors.torch import load_file

        model = LateInteraction(load_token_encoder(model_dir), int(meta["colbert_dim"]))
        head = os.path.join(model_dir, meta.get("colbert_head", COLBERT_HEAD_FILE))
        if not os.path.exists(head):
            raise FileNotFoundError(f"{model_dir}: late-interaction reranker without its compressor {head}")
        model.compressor.load_state_dict(load_file(head))
    model.eval()  # transformers 5 builds models in train mode (dropout on)
    return model, meta


def _load_bi_encoder(model_dir: str, meta: dict) -> BiEncoder:
    from safetensors.torch import load_file

    passage_dir = os.path.join(model_dir, meta.get("passage_encoder", PASSAGE_ENCODER_DIR))
    head = os.path.join(model_dir, meta.get("bi_head", BI_HEAD_FILE))
    for path in (passage_dir, head):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{model_dir}: bi-encoder reranker without its {os.path.basename(path)}")
    weights = load_file(head)
    return BiEncoder(load_token_encoder(model_dir), load_token_encoder(passage_dir),
                     float(weights["retrieval_weight"][0]) if meta.get("uses_retrieval") else None,
                     scale=float(weights["scale"][0]))


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
        # bi-encoder: passage vectors by passage string. The passage side is frozen and this object's model,
        # lengths and autocast never change, so a hit is exact; candidate lists of different questions overlap.
        self._passage_vectors: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.passage_cache_size = 50_000  # ~77 MB of 384-d vectors

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

    def rerank(self, question: str, candidates: list[str], retrieval_scores=None) -> np.ndarray:
        """One float32 score per candidate (higher = more relevant), in the candidates' order.

        `retrieval_scores`: the candidates' first-stage scores, which a bi-encoder with a retrieval weight adds
        (standardised over the list); without them such a model ranks by its own cosine alone. The other
        architectures ignore them."""
        return self.rerank_batch([question], [candidates],
                                 None if retrieval_scores is None else [retrieval_scores])[0]

    @property
    def uses_retrieval(self) -> bool:
        """Whether scores depend on the first-stage retrieval scores (a bi-encoder with a retrieval weight)."""
        return bool(getattr(self.model, "uses_retrieval", False))

    @torch.inference_mode()
    def rerank_batch(self, questions: list[str], candidates: list[list[str]],
                     retrieval_scores: Optional[list] = None) -> list[np.ndarray]:
        """Scores per question; all pairs of the batch are scored in chunks of `pair_batch_size`."""
        if len(questions) != len(candidates):
            raise ValueError(f"rerank_batch: {len(questions)} questions but {len(candidates)} candidate lists")
        lengths = [len(c) for c in candidates]
        if retrieval_scores is not None and [len(r) for r in retrieval_scores] != lengths:
            raise ValueError("rerank_batch: retrieval_scores must hold one score per candidate of each question")
        q_index = np.repeat(np.arange(len(questions)), lengths)
        passages = [p for c in candidates for p in c]
        flat = np.zeros(len(passages), dtype=np.float32)
        if passages:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                flat = self._scores(questions, q_index, passages, retrieval_scores)
        bounds = np.cumsum([0] + lengths)
        return [flat[bounds[i]:bounds[i + 1]] for i in range(len(questions))]

    def _scores(self, questions: list[str], q_index: np.ndarray, passages: list[str],
                retrieval_scores: Optional[list]) -> np.ndarray:
        if self.architecture == "cross_encoder":
            return self._cross_scores(questions, q_index, passages)
        if self.architecture == "bi_encoder":
            return self._bi_scores(questions, q_index, passages, retrieval_scores)
        return self._late_scores(questions, q_index, passages)

    def _bi_scores(self, questions: list[str], q_index: np.ndarray, passages: list[str],
                   retrieval_scores: Optional[list]) -> np.ndarray:
        q_enc = _to_torch(encode_texts(self.tokenizer, questions, self.max_query_length), self.device)
        q_vecs = self.model.encode_queries(q_enc["input_ids"], q_enc["attention_mask"], q_enc.get("token_type_ids"))
        d_vecs = self._bi_passage_vectors(passages)
        retrieval = None
        if self.uses_retrieval and retrieval_scores is not None:
            retrieval = torch.cat([standardise(torch.as_tensor(np.asarray(r, np.float32))[None])[0]
                                   for r in retrieval_scores]).to(self.device)
        elif self.uses_retrieval:  # the retrieval term is absent: the model's own cosine ranks alone
            retrieval = torch.zeros(len(passages), device=self.device)
        return self.model.combine(q_vecs, d_vecs, torch.from_numpy(q_index).to(self.device),
                                  retrieval).float().cpu().numpy().astype(np.float32)

    def _bi_passage_vectors(self, passages: list[str]) -> torch.Tensor:
        """[n, h] frozen passage vectors, each distinct passage encoded once (LRU of `passage_cache_size`)."""
        cache = self._passage_vectors
        todo = list(dict.fromkeys(p for p in passages if p not in cache))
        for s in range(0, len(todo), self.pair_batch_size):
            chunk = todo[s:s + self.pair_batch_size]
            d_enc = _to_torch(encode_texts(self.tokenizer, chunk, self.max_length), self.device)
            vecs = self.model.encode_passages(d_enc["input_ids"], d_enc["attention_mask"], d_enc.get("token_type_ids"))
            cache.update(zip(chunk, vecs.float()))
        out = torch.stack([cache[p] for p in passages])
        for p in passages:
            cache.move_to_end(p)
        while len(cache) > self.passage_cache_size:
            cache.popitem(last=False)
        return out

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
        first_stage = [list(x or []) for x in batch.column("passage_scores").to_pylist()]
        scores = self.reranker.rerank_batch([str(q) for q in batch.column("query").to_pylist()], cands, first_stage)
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


