"""The two distributed strategies behind one small interface: torch (in-process or DDP) and DeepSpeed.

The loop in `core.py` only calls `forward_context`, `backward`, `step`, `save`, `load` and
`export_state_dict`, so the student and the reranker train the same way under either strategy.

Checkpoint layout (one Ray Train checkpoint directory per save):
  torch:     state.pt (model, optimizer, scheduler) written by rank 0, plus meta.json (core.py)
  deepspeed: ds/<tag>/... written by **every** rank (each its own ZeRO shard; Ray Train merges the
             ranks' uploads into one directory), plus meta.json from rank 0
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from kard_ray.config import TrainingConfig
from kard_ray.models import cpu_has_native_bf16
from kard_ray.training.optim import build_optimizer, build_scheduler

DS_TAG = "ckpt"


def _dist_on(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


class TorchEngine:
    """Plain torch: DDP when the worker group has more than one rank, the bare module otherwise."""

    name = "ddp"

    def __init__(self, model: torch.nn.Module, cfg: TrainingConfig, total_steps: int, device: torch.device,
                 world: int, find_unused_parameters: bool = False):
        self.cfg, self.device, self.world = cfg, device, world
        self.unwrapped = model.to(device)
        if _dist_on(world):
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(self.unwrapped, device_ids=[device.index] if device.type == "cuda" else None,
                              gradient_as_bucket_view=True, find_unused_parameters=find_unused_parameters)
        else:
            self.module = self.unwrapped
        self.optimizer = build_optimizer(self.unwrapped, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)
        self.autocast = use_autocast(device, cfg)

    def forward_context(self, last_micro: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation window."""
        if self.module is not self.unwrapped and not last_micro:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Clip, optimizer step, schedule step, zero grads; returns the pre-clip grad norm (a tensor: no sync)."""
        params = [p for p in self.unwrapped.parameters() if p.grad is not None]
        if self.cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, directory: str, rank: int) -> None:
        if rank == 0:
            torch.save({"model": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, os.path.join(directory, "state.pt"))

    def load(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "state.pt"), map_location=self.device, weights_only=False)
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def gather_master_weights(self) -> None:
        """Nothing to gather: under DDP every rank holds the full fp32 weights."""

    def export_model(self, build_model, model_config: dict, checkpoint_dir: Optional[str], rank: int):
        """The trained module (every rank holds full weights under DDP); only rank 0 uses it."""
        return self.unwrapped if rank == 0 else None


def use_autocast(device: torch.device, cfg: TrainingConfig) -> bool:
    """Whether the forward passes run under bf16 autocast on `device` (GPU: `bf16`; CPU: `cpu_bf16`)."""
    if device.type == "cuda":
        return bool(cfg.bf16)
    if cfg.cpu_bf16:
        if cpu_has_native_bf16():
            return True
        from kard_ray import console  # a worker's line reaches the driver's console (its warnings would not)

        console.say("[train] WARNING cpu_bf16: this CPU has no native bf16 (AVX-512 BF16 / AMX); training in fp32")
    return False


def deepspeed_config(cfg: TrainingConfig, use_bf16: bool) -> dict:
    """The DeepSpeed config a TrainingConfig implies (no optimizer entry: we pass a torch AdamW)."""
    zero: dict[str, Any] = {"stage": int(cfg.zero_stage)}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": int(cfg.batch_size),
        "gradient_accumulation_steps": int(cfg.grad_accum),
        "gradient_clipping": float(cfg.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(use_bf16)},
        "fp16": {"enabled": False},
        # A torch optimizer under ZeRO: DeepSpeed calls it "untested"; it is what runs on CPU without
        # a JIT build of fused Adam (RAY_NOTES).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3. The engine owns accumulation boundaries, clipping and the lr schedule."""

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg: TrainingConfig, total_steps: int, device: torch.device,
                 world: int, find_unused_parameters: bool = False):
        import deepspeed

        self.cfg, self.device, self.world = cfg, device, world
        use_bf16 = device.type == "cuda" and cfg.bf16
        model = model.to(device)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, use_bf16))
        self.module = self.engine
        self.unwrapped = self.engine.module
        self.autocast = False  # the engine casts to bf16 itself (config "bf16")
        self.master_state: Optional[dict] = None

    def forward_context(self, last_micro: bool):
        return contextlib.nullcontext()  # the engine knows the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        # The core already weights each micro-batch (token-exact accumulation), so no 1/GAS scaling.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # a no-op except at the accumulation boundary

    def step(self) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan"))
        return norm.detach() if torch.is_tensor(norm) else torch.tensor(float(norm))

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def gather_master_weights(self) -> None:
        """bf16 + ZeRO-0: the module holds bf16 weights and DeepSpeed's BF16_Optimizer the fp32 masters,
        partitioned across ranks; exporting `module.float()` would ship bf16-rounded weights. Every rank
        takes part in gathering the full fp32 copy of each parameter (a collective); rank 0 keeps it.
        (ZeRO 1-3 consolidate from the checkpoint instead: `export_model`.)"""
        self.master_state = None
        if self.cfg.zero_stage != 0 or not self.engine.bfloat16_enabled():
            return
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, p in self.unwrapped.named_parameters():
            full = safe_get_full_fp32_param(p)
            state[name] = (full if full is not None else p.detach().float()).cpu().clone()
        self.master_state = state if not dist.is_initialized() or dist.get_rank() == 0 else None

    def save(self, directory: str, rank: int) -> None:
        # Every rank: each writes its own ZeRO shard and the call holds collectives (RAY_NOTES).
        self.engine.save_checkpoint(os.path.join(directory, "ds"), tag=DS_TAG)

    def load(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(os.path.join(directory, "ds"), tag=DS_TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/ds (tag {DS_TAG!r})")

    def export_model(self, build_model, model_config: dict, checkpoint_dir: Optional[str], rank: int):
        """A plain fp32 module with the trained weights, on rank 0 (None elsewhere).

        ZeRO 1-3 keep fp32 master weights partitioned across ranks (and ZeRO-3 the module weights
        too), so they are consolidated from the merged checkpoint every rank just wrote; stage 0
        holds full weights in the module.
        """
        if rank != 0:
            return None
        if self.cfg.zero_stage == 0:
            if self.master_state is None:
                return self.unwrapped
            model = build_model(model_config)  # fp32, loaded with the fp32 masters (not bf16-rounded)
            load_full_state(model, self.master_state)
            return model
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if checkpoint_dir is None:
            raise RuntimeError("DeepSpeed export needs the final checkpoint directory")
        state = get_fp32_state_dict_from_zero_checkpoint(os.path.join(checkpoint_dir, "ds"), tag=DS_TAG)
        model = build_model(model_config)
        load_full_state(model, state)
        return model


def load_full_state(model: torch.nn.Module, state: dict) -> None:
    """load_state_dict that tolerates only the names of tied weights being absent (e.g. T5's lm_head)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    by_ptr: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(p.data_ptr(), []).append(name)
    tied = {n for names in by_ptr.values() if len(names) > 1 for n in names}
    bad_missing = [k for k in missing if k not in tied and not k.endswith("_buffer")]
    if unexpected or bad_missing:
        raise RuntimeError(f"consolidated weights do not fit the model: missing {bad_missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def make_engine(cfg: TrainingConfig, model: torch.nn.Module, total_steps: int, device: torch.device,
                world: int, find_unused_parameters: bool = False):
    cls = DeepSpeedEngine if cfg.strategy == "deepspeed" else TorchEngine
    return cls(model, cfg, total_steps, device, world, find_unused_parameters)
