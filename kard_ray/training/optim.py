"""AdamW and the learning-rate schedules of the trainer core.

Kept free of Ray and DeepSpeed so the same optimizer and schedule back every strategy (DDP, DeepSpeed,
in-process) and can be unit-tested directly.
"""

from __future__ import annotations

from typing import Callable

import math

import torch

from kard_ray.config import TrainingConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay, vectors (norm weights, biases) do not — the usual AdamW recipe."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """torch AdamW (DeepSpeed on CPU needs a torch optimizer: naming one in its config JIT-builds fused Adam)."""
    kw = {"lr": cfg.lr, "betas": (0.9, 0.999), "eps": 1e-8}
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        kw["fused"] = True  # one kernel per step on GPU; not available on CPU
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kw)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after `step` optimizer steps.

    constant: linear warmup (if any) then flat. linear / cosine: linear warmup then linear / cosine decay
    to 0 at `total_steps`. Warmup starts at 1/warmup (never exactly 0, so step 1 already moves the weights).
    """
    total = max(int(total_steps), 1)
    warm = max(int(warmup_steps), 0)

    def fn(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        if schedule == "linear":
            return max(0.0, (total - step) / max(total - warm, 1))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(total - warm, 1))))
        raise ValueError(f"schedule: unknown {schedule!r} (expected 'constant', 'linear' or 'cosine')")

    return fn


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    """`warmup_steps` when set, else `warmup_ratio` of the total steps (rounded up: a ratio above 0 warms up)."""
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * max(int(total_steps), 0))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup_steps(cfg, total_steps), total_steps))
