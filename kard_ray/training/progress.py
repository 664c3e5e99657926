"""Progress of a training run: the per-step loss log, throughput, ETA, MFU and the live progress line.

Per-step values stay on the device as tensors until a flush (every `log_every_steps`, and before each
checkpoint), so the loop adds no host synchronisation per step; a flush averages the losses across
ranks with one all-reduce. Rank 0 keeps the whole log (one small dict per step): it goes into every
checkpoint, so a restarted run rewrites `<output>/train_log.jsonl` without gaps or repeats.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from kard_ray import console, io
from kard_ray.console import fmt_duration

# Dense peak FLOP/s per GPU at bf16 (tensor cores), for MFU. Matched by substring of the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "V100": 125e12,  # fp16: V100 has no bf16
    "T4": 65e12,
}


def peak_flops(device: torch.device) -> Optional[float]:
    """Peak bf16 FLOP/s of the GPU, or None (CPU, or a GPU not in the table: then no MFU is shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


class Progress:
    """Collects per-step values, flushes them (log file, metrics) and prints the progress line."""

    def __init__(self, *, name: str, rank: int, world: int, total_steps: int, samples_per_step: int,
                 log_path: Optional[str], log_every: int, device: torch.device,
                 flops_per_token: Optional[float], start_step: int, log: list[dict],
                 prior_train_time_s: float = 0.0):
        self.name, self.rank, self.world = name, rank, world
        self.total_steps, self.samples_per_step = total_steps, samples_per_step
        self.log_path, self.log_every, self.device = log_path, log_every, device
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device)
        self.start_step = start_step
        self.log: list[dict] = list(log)  # rank 0: every step so far (restored from the checkpoint)
        self.prior_train_time_s = prior_train_time_s
        self._pending: list[tuple[int, int, torch.Tensor, torch.Tensor, float, Optional[dict]]] = []
        self._tokens = torch.zeros((), dtype=torch.float64, device=device)  # this rank, this attempt
        self._tokens_global = 0.0
        self._t0 = time.perf_counter()
        self._written = 0  # entries of self.log already in the local log file
        if rank == 0 and log_path:
            self._rewrite_log()

    # -- per step (no host sync) -----------------------------------------------------------------
    def add_tokens(self, n) -> None:
        self._tokens += n

    def record(self, step: int, epoch: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
               extra: Optional[dict] = None) -> None:
        """extra: plain numbers logged with the step (e.g. val_accuracy, already the same on every rank)."""
        self._pending.append((step, epoch, loss.detach().float(), grad_norm.detach().float(), lr, extra))

    # -- flush -----------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def flush(self, step: int) -> dict:
        """Turn pending tensors into numbers (one all-reduce), extend the log, return the metrics."""
        pending, self._pending = self._pending, []
        if pending:
            vals = torch.stack([torch.stack([p[2].to(self.device), p[3].to(self.device)]) for p in pending])
            tok = self._tokens.clone()
            if self.world > 1 and dist.is_initialized():
                # Losses are already weighted so that the mean over ranks is the global loss.
                flat = torch.cat([vals[:, 0].double(), tok.reshape(1)])
                dist.all_reduce(flat)
                vals[:, 0] = (flat[:-1] / self.world).float()
                tok = flat[-1]
            vals = vals.cpu().tolist()
            self._tokens_global = float(tok)
            for (s, ep, _, _, lr, extra), (loss, gn) in zip(pending, vals):
                self.log.append({"step": s, "epoch": ep, "loss": loss, "grad_norm": gn, "lr": lr, **(extra or {})})
            if self.rank == 0 and self.log_path:
                self._append_log()
        return self.metrics(step)

    def metrics(self, step: int) -> dict:
        el = max(self.elapsed(), 1e-9)
        done = step - self.start_step
        samples_per_s = done * self.samples_per_step / el
        tokens_per_s = self._tokens_global / el
        eta = (self.total_steps - step) * el / done if done > 0 else float("inf")
        last = self.log[-1] if self.log else {}
        m = {"step": step, "epoch": last.get("epoch", 0), "loss": last.get("loss", float("nan")),
             "lr": last.get("lr", 0.0), "grad_norm": last.get("grad_norm", float("nan")),
             "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s, "eta_s": eta if math.isfinite(eta) else -1.0,
             "train_time_s": self.prior_train_time_s + el}
        if self.peak and self.flops_per_token:
            m["mfu"] = self.flops_per_token * tokens_per_s / (self.peak * self.world)
        return m

    def print_line(self, m: dict) -> None:
        if self.rank != 0:
            return
        pct = 100.0 * m["step"] / max(self.total_steps, 1)
        line = (f"[{self.name}] step {m['step']}/{self.total_steps} ({pct:.0f}%) ep {m['epoch']} | "
                f"loss {m['loss']:.4f} | lr {m['lr']:.2e} | {m['samples_per_s']:.1f} samples/s "
                f"{_si(m['tokens_per_s'])} tok/s")
        if "mfu" in m:
            line += f" | MFU {100 * m['mfu']:.1f}%"
        line += f" | eta {fmt_duration(m['eta_s'] if m['eta_s'] >= 0 else float('inf'))}"
        console.progress(self.name, line, final=m["step"] >= self.total_steps,
                         fraction=m["step"] / max(self.total_steps, 1))

    # -- the log file ----------------------------------------------------------------------------
    def _lines(self, entries: list[dict]) -> bytes:
        return "".join(json.dumps(e) + "\n" for e in entries).encode()

    def _rewrite_log(self) -> None:
        io.write_bytes(self.log_path, self._lines(self.log))
        self._written = len(self.log)

    def _append_log(self) -> None:
        if io.is_uri(self.log_path):
            self._rewrite_log()  # object stores cannot append: rewrite (the log is small)
            return
        with open(self.log_path, "ab") as fh:
            fh.write(self._lines(self.log[self._written:]))
        self._written = len(self.log)


def read_train_log(path: str) -> list[dict]:
    """The per-step log written by rank 0 (`<output>/train_log.jsonl`)."""
    return [json.loads(line) for line in io.read_bytes(path).decode().splitlines() if line.strip()]

