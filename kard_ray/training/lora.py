"""LoRA adapters (the `peft` library) on whatever model a TrainTask builds, merged away at export.

The trainer core never sees the difference: `build_model` returns a peft-wrapped module (only the
adapters, and the heads a task adds, require gradients, so the optimizer, DDP and DeepSpeed ZeRO hold
just those), checkpoints hold its state dict, and `merge_lora` folds the adapters into the base weights
before `save_pretrained`, so an exported LoRA model is a plain HF directory that `from_pretrained`,
`StudentGenerator(model_dir)` and `Reranker.from_dir` load as they load any other.

    model = apply_lora(load_seq2seq(path), lora_settings(cfg.student.lora), "SEQ_2_SEQ_LM")
    ...train...
    merge_lora(model).save_pretrained(out)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from kard_ray.config import LoraConfig


def lora_settings(cfg: LoraConfig) -> Optional[dict]:
    """The adapters as a plain dict for a TrainTask's `model_config` (what a worker builds from), or
    None when `lora.r` is 0 (full fine-tuning)."""
    return dataclasses.asdict(cfg) if cfg.r > 0 else None


def apply_lora(model: torch.nn.Module, settings: Optional[dict], task_type: str) -> torch.nn.Module:
    """`model` with LoRA adapters (peft `get_peft_model`) per `settings`, or unchanged for None.

    task_type is peft's: SEQ_2_SEQ_LM (student), SEQ_CLS (cross-encoder: its classifier head trains
    fully, peft's `modules_to_save`), FEATURE_EXTRACTION (a late-interaction encoder)."""
    if not settings:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = settings.get("target_modules")
    config = PeftLoraConfig(r=int(settings["r"]), lora_alpha=float(settings["alpha"]),
                            lora_dropout=float(settings["dropout"]), task_type=task_type,
                            target_modules=list(targets) if targets else None)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. no default target modules for this model type
        raise ValueError(f"lora: {e} (set lora.target_modules to the model's attention projection names)") from e


def merge_lora(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every peft adapter in `module` (itself, or one of its direct children such as a reranker's
    encoder) into the base weights and drop the wrappers; a module without adapters comes back as is."""
    try:
        from peft import PeftModel
    except ImportError:
        return module
    if isinstance(module, PeftModel):
        return module.merge_and_unload()
    for name, child in list(module.named_children()):
        if isinstance(child, PeftModel):
            setattr(module, name, child.merge_and_unload())
    return module
