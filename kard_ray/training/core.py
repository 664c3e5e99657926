"""The one training loop of kard-ray: Ray Train's TorchTrainer around a task-agnostic step.

A model family plugs in a `TrainTask` (how to build the model, the loss, the collate function, the
export); `train()` runs it on a Ray Dataset with DDP or DeepSpeed ZeRO 0-3, checkpoints and resumes
at the exact step, logs progress, and exports a `save_pretrained` directory.

    result = train(task, ds, cfg.student, output_dir=run.model("student_kard"),
                   storage_path=run.checkpoints, name="student_kard", model_config={...})

`cfg.num_workers == 0` runs the same loop in the calling process (Ray Train's local mode): no worker
start-up, no checkpoints (nothing could restart from them) — fast for tests and benchmarks.

Gradient accumulation is token-exact: every micro-batch carries the number of items its loss averages
over (`TrainTask.count_fn`, e.g. target tokens; rows by default), and its loss is weighted by its share
of the whole step's items across all ranks, so `batch 1 × accum 8 == batch 8 × accum 1` and the
step's loss is the true per-token mean however the batch is split (trl's gradient-accumulation fix).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from kard_ray import io
from kard_ray.io import tree_digest  # noqa: F401  (re-exported: the trainers digest their examples)
from kard_ray.config import TrainingConfig
from kard_ray.training.engines import make_engine
from kard_ray.console import say
from kard_ray.training.progress import Progress, read_train_log

N_KEY = "_n_items"  # added to every collated batch by the core (popped before loss_fn sees it)
LOG_FILE = "train_log.jsonl"
META_FILE = "meta.json"
SUMMARY_FILE = "train_summary.json"
BEST_FILE = "best_weights.pt"  # in a checkpoint: the best-validating weights so far (rank 0)
FAIL_ENV = "KARD_TRAIN_FAIL_AT_STEP"


@dataclass
class TrainTask:
    """What a model family plugs into the core (the student now, the reranker next).

    build_model(model_config) -> module       called inside each worker
    loss_fn(model, batch, step) -> (loss, n_tokens)
        loss: the mean over the items of this batch (the core weights micro-batches exactly);
        n_tokens: tokens processed (int or 0-dim tensor), for tokens/s and MFU only
    collate_fn(numpy batch) -> tensors         dynamic padding, runs in Ray Data's prefetch thread
    export_fn(module, directory)               save_pretrained (+ tokenizer) into a local directory
    count_fn(collated batch) -> int            items `loss` averages over (target tokens for a
                                               seq2seq model); None = rows
    flops_per_token(module) -> float           for MFU (GPU only); None = kard_ray.models.flops_per_token
    find_unused_parameters                     DDP option for models with branches unused per step
    validate_fn(module, rows) -> (correct, n)  score held-out rows (this rank's share) with the model in
                                               eval mode; `train(validation=..., validate_every=N)`
                                               then exports the best-scoring step's weights
    """

    build_model: Callable[[dict], torch.nn.Module]
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor], int], tuple[torch.Tensor, int]]
    collate_fn: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]]
    export_fn: Callable[[torch.nn.Module, str], None]
    count_fn: Optional[Callable[[dict[str, torch.Tensor]], int]] = None
    flops_per_token: Optional[Callable[[torch.nn.Module], float]] = None
    find_unused_parameters: bool = False
    validate_fn: Optional[Callable[[torch.nn.Module, list[dict]], tuple[int, int]]] = None


@dataclass(frozen=True)
class Plan:
    """Step arithmetic decided once in the driver, identical on every rank."""

    n_rows: int
    world: int
    rows_per_rank: int
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    samples_per_step: int  # global
    epoch_checkpoints: bool


def make_plan(cfg: TrainingConfig, n_rows: int, model_config: dict | None = None) -> Plan:
    """Steps per epoch and in total. Ray Train splits the dataset equally across ranks
    (`streaming_split(equal=True)`) and micro-batches are full (`drop_last`), so every rank runs the
    same number of steps — a rank with an extra step would hang the others in an all-reduce."""
    world = max(cfg.num_workers, 1)
    rows_per_rank = n_rows // world
    micro = rows_per_rank // cfg.batch_size
    spe = micro // cfg.grad_accum
    if spe < 1:
        raise ValueError(
            f"training data too small: {n_rows} rows over {world} worker(s) gives {rows_per_rank} rows per "
            f"worker, fewer than batch_size × grad_accum = {cfg.batch_size} × {cfg.grad_accum}")
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * spe
    return Plan(n_rows, world, rows_per_rank, micro, spe, total, cfg.batch_size * cfg.grad_accum * world,
                epoch_checkpoints=cfg.max_steps is None)


# ------------------------------------------------------------------------------------------------
# what decides the trained weights: a checkpoint is reused only when all of it is unchanged

# Training keys that cannot change the weights (how often to log or checkpoint, how many to keep,
# how often to retry). Every other key of the training section is part of the fingerprint.
NOT_WEIGHT_KEYS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "max_failures")


def weight_inputs(cfg: TrainingConfig, model_config: dict, seed: int, n_rows: int,
                  data_digest: Optional[str]) -> dict:
    """Everything that decides the trained weights, as a flat {label: value} dict (kept in every
    checkpoint, so a mismatch can say what changed)."""
    import dataclasses

    section = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_WEIGHT_KEYS}
    out = {f"train.{k}": v for k, v in sorted(section.items())}
    out.update({f"model.{k}": v for k, v in sorted(model_config.items())})
    out["seed"] = seed
    out["init model files"] = tree_digest(model_config.get("init_model"))
    out["training examples"] = data_digest
    out["training rows"] = n_rows
    return json.loads(json.dumps(out, default=str))  # what a checkpoint's meta.json reads back


def fingerprint_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def describe_change(old: dict, new: dict, limit: int = 4) -> str:
    """`config changed (seed 0 -> 1, train.lr 0.001 -> 0.002)` for the keys that differ."""
    def short(v):
        text = json.dumps(v) if not isinstance(v, str) else v
        return text if len(text) <= 40 else text[:37] + "..."

    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not keys:
        return "config unchanged"
    parts = [f"{k} {short(old.get(k))} -> {short(new.get(k))}" for k in keys[:limit]]
    more = f", +{len(keys) - limit} more" if len(keys) > limit else ""
    return f"config changed ({', '.join(parts)}{more})"


def _collate_class():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class CountingCollate(NumpyBatchCollateFn):
        """The task's collate plus the item count the core needs for exact accumulation."""

        def __init__(self, fn, count_fn):
            self.fn, self.count_fn = fn, count_fn

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            out = self.fn(batch)
            n = self.count_fn(out) if self.count_fn is not None else len(next(iter(batch.values())))
            out[N_KEY] = torch.tensor(float(n))
            return out

    return CountingCollate


# ------------------------------------------------------------------------------------------------
# the worker loop


def _device(cfg: TrainingConfig, local_mode: bool) -> torch.device:
    if not cfg.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu=true but this worker sees no CUDA device")
    if local_mode:
        return torch.device("cuda", torch.cuda.current_device())
    import ray.train.torch

    dev = ray.train.torch.get_device()
    torch.cuda.set_device(dev)
    return dev


def _enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(f"gradient_checkpointing=true but {type(model).__name__} has no gradient_checkpointing_enable()")
    # Non-reentrant checkpointing works with DDP and with inputs that do not require grad.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(getattr(model, "config", None), "use_cache", None):
        model.config.use_cache = False


def _maybe_fail(config: dict, step: int, rank: int, world: int) -> None:
    """Failure injection for tests and chaos runs: the last rank raises once at `fail_at_step`.

    A marker file on the run's storage makes it fire once, so the restarted group gets past it."""
    at, marker = config.get("fail_at_step"), config.get("fail_marker")
    if at is None or step != at or rank != world - 1 or marker is None or io.exists(marker):
        return
    io.write_bytes(marker, f"failed once at step {step}\n".encode())
    raise RuntimeError(f"injected failure at step {step} on rank {rank} ({FAIL_ENV} / fail_at_step)")


def _train_step(engine, task: TrainTask, micro: list[dict], step: int, world: int, progress: Progress):
    counts = torch.stack([b.pop(N_KEY) for b in micro]).to(engine.device)
    total = counts.sum()
    if world > 1 and dist.is_initialized():
        dist.all_reduce(total)
    # DDP and DeepSpeed average gradients over ranks, hence the factor `world`.
    weights = counts * (world / total)
    step_loss = torch.zeros((), device=engine.device)
    for i, batch in enumerate(micro):
        with engine.forward_context(last_micro=i == len(micro) - 1):
            with torch.autocast(engine.device.type, dtype=torch.bfloat16) if engine.autocast else contextlib.nullcontext():
                loss, n_tokens = task.loss_fn(engine.module, batch, step)
            weighted = loss.float() * weights[i]
            engine.backward(weighted)
        step_loss += weighted.detach()
        progress.add_tokens(n_tokens)
    return step_loss, engine.step()


def _save_checkpoint(engine, config: dict, plan: Plan, step: int, metrics: dict, progress: Progress,
                     rank: int, best: Optional["_Best"] = None) -> None:
    """Every rank writes its part (DeepSpeed shard, RNG state) to a temp dir and reports it; Ray Train
    merges the ranks' files into one checkpoint directory and keeps the last K. meta.json carries the
    run's fingerprint and the inputs behind it, so a later run can tell whether this is its own."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="kard_ckpt_")
    try:
        engine.save(tmp, rank)
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        if rank == 0:
            meta = {"step": step, "fingerprint": config["fingerprint"], "inputs": config["weight_inputs"],
                    "log": progress.log, "train_time_s": metrics["train_time_s"], "strategy": engine.name,
                    "world": plan.world}
            if best is not None and best.step >= 0:
                # the best weights so far travel with the checkpoint, so a resumed run exports the same best
                meta["best"] = {"step": best.step, "score": best.score}
                torch.save(best.state, os.path.join(tmp, BEST_FILE))
            with open(os.path.join(tmp, META_FILE), "w") as fh:
                json.dump(meta, fh)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step{step:08d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _restore(engine, config: dict, rank: int):
    """(start_step, log, prior_train_time_s, best) from the latest checkpoint, or None to start fresh.

    The driver has already moved aside checkpoints of any other run (`_prepare_storage`); the
    fingerprint is checked again here because a checkpoint is only ever restored into its own run."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        meta_path = os.path.join(d, META_FILE)
        if not os.path.exists(meta_path):
            raise RuntimeError(f"checkpoint {ckpt.path} has no {META_FILE}: not written by kard_ray.training")
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("fingerprint") != config["fingerprint"]:
            raise RuntimeError(f"checkpoint {ckpt.path} belongs to another run: "
                               f"{describe_change(meta.get('inputs', {}), config['weight_inputs'])}")
        engine.load(d)
        rng = os.path.join(d, f"rng_rank{rank}.pt")
        if os.path.exists(rng):
            _set_rng_state(torch.load(rng, weights_only=False))
        best = _Best()
        if meta.get("best"):
            best.step, best.score = int(meta["best"]["step"]), float(meta["best"]["score"])
            if rank == 0:
                best.state = torch.load(os.path.join(d, BEST_FILE), weights_only=True)
    if rank == 0:
        say(f"[{config['name']}] resumed from {ckpt.path} at step {meta['step']}")
    return int(meta["step"]), list(meta["log"]), float(meta.get("train_time_s", 0.0)), best


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a hash of (seed, epoch), so (0, 1) and (1, 0) differ."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\x1f{epoch}".encode(), digest_size=4).digest(), "big")


@dataclass
class _Best:
    """The best validation score so far, its step, and (rank 0) a CPU copy of its weights."""

    step: int = -1
    score: float = float("-inf")
    state: Optional[dict] = None


@dataclass
class _Worker:
    """What one rank holds for the whole run (set up once)."""

    task: TrainTask
    cfg: TrainingConfig
    plan: Plan
    rank: int
    world: int
    local_mode: bool
    device: torch.device
    engine: object
    flops_per_token: Optional[float] = None
    progress: Optional[Progress] = None
    validation: tuple = ()  # this rank's share of the held-out rows


@dataclass
class _State:
    """Where the loop is: the step and epoch, micro-batches to skip on resume, the last checkpoint."""

    step: int
    epoch: int
    skip: int
    last_ckpt: int
    metrics: Optional[dict] = None
    best: Optional[_Best] = None


def _setup_worker(config: dict) -> _Worker:
    """Rank, device, threads, the seeded model (optionally checkpointed activations) and its engine."""
    import ray.train

    task, cfg, plan, local_mode = config["task"], config["cfg"], config["plan"], config["local_mode"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != plan.world:
        raise RuntimeError(f"worker group has {world} ranks, plan expected {plan.world}")
    device = _device(cfg, local_mode)
    if device.type == "cpu" and not local_mode:
        # intra-op threads = the CPUs the worker reserved (Ray's OMP_NUM_THREADS says the same, but a
        # fractional reservation must still get one thread, and a user's env var must not oversubscribe)
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(config["seed"])
    model = task.build_model(config["model_config"])
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    model.train()
    fpt = None
    if device.type == "cuda":  # MFU on GPU only; counted before ZeRO-3 partitions the parameters
        from kard_ray.models import flops_per_token

        fpt = (task.flops_per_token or flops_per_token)(model)
    engine = make_engine(cfg, model, plan.total_steps, device, world, task.find_unused_parameters)
    return _Worker(task, cfg, plan, rank, world, local_mode, device, engine, flops_per_token=fpt,
                   validation=tuple(config["validation"][rank::world]))


def _resume_state(w: _Worker, config: dict) -> _State:
    """Restore the identical run's latest checkpoint (or start at step 0) and open the progress log."""
    restored = _restore(w.engine, config, w.rank)
    start_step, log, prior_time, best = restored if restored else (0, [], 0.0, _Best())
    output_dir = config["output_dir"]
    if w.rank == 0 and restored is None and io.exists(output_dir):
        io.remove(output_dir)  # fresh run: no stale model files or log next to the new ones
    w.progress = Progress(name=config["name"], rank=w.rank, world=w.world, total_steps=w.plan.total_steps,
                          samples_per_step=w.plan.samples_per_step, log_path=io.join(output_dir, LOG_FILE),
                          log_every=w.cfg.log_every_steps, device=w.device, flops_per_token=w.flops_per_token,
                          start_step=start_step, log=log, prior_train_time_s=prior_time)
    spe = w.plan.steps_per_epoch
    # micro-batches of the current epoch already trained on: skipped, so the resumed run sees exactly
    # the batches the uninterrupted one would (the epoch's order is a function of (seed, epoch))
    return _State(step=start_step, epoch=start_step // spe, skip=(start_step % spe) * w.cfg.grad_accum,
                  last_ckpt=start_step if restored else -1, best=best)


def _validate(w: _Worker, config: dict, st: _State) -> Optional[float]:
    """Validation accuracy at this step when due (every `validate_every` steps and at the last): each
    rank scores its share of the held-out rows, one all-reduce sums them. A new best keeps (rank 0) a
    CPU copy of the weights. Greedy decoding in eval mode draws no random numbers, so a resumed run
    trains exactly as the uninterrupted one."""
    every = config["validate_every"]
    if not every or not (st.step % every == 0 or st.step == w.plan.total_steps):
        return None
    model = w.engine.unwrapped
    model.eval()
    try:
        with torch.no_grad():
            correct, n = w.task.validate_fn(model, list(w.validation)) if w.validation else (0, 0)
    finally:
        model.train()
    counts = torch.tensor([float(correct), float(n)], dtype=torch.float64, device=w.device)
    if w.world > 1 and dist.is_initialized():
        dist.all_reduce(counts)
    acc = float(counts[0] / counts[1]) if counts[1] > 0 else 0.0
    if acc > st.best.score:  # ties keep the earlier step
        st.best.step, st.best.score = st.step, acc
        if w.rank == 0:
            st.best.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if w.rank == 0:
        say(f"[{config['name']}] step {st.step}: val_accuracy {acc:.3f} on {int(counts[1])} questions "
          f"(best {st.best.score:.3f} at step {st.best.step})")
    return acc


def _epoch_batches(w: _Worker, config: dict, epoch: int):
    """This rank's micro-batches of one epoch, in an order seeded by (seed, epoch)."""
    import ray.train

    cfg = w.cfg
    shuffle = config["shuffle"]
    buffer = max(cfg.batch_size, min(w.plan.rows_per_rank, cfg.shuffle_buffer_rows)) if shuffle else None
    return ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=cfg.batch_size, collate_fn=_collate_class()(w.task.collate_fn, w.task.count_fn),
        device=w.device, drop_last=True, prefetch_batches=2, pin_memory=w.device.type == "cuda",
        local_shuffle_buffer_size=buffer, local_shuffle_seed=epoch_seed(config["seed"], epoch) if shuffle else None)


def _after_step(w: _Worker, config: dict, st: _State, loss, gnorm, lr: float) -> None:
    """Record the step; flush/print the log and write (and report) checkpoints when due."""
    plan, cfg = w.plan, w.cfg
    val = _validate(w, config, st)
    w.progress.record(st.step, st.epoch, loss, gnorm, lr, extra=None if val is None else {"val_accuracy": val})
    _maybe_fail(config, st.step, w.rank, w.world)
    ckpt_every = 0 if w.local_mode else cfg.checkpoint_every_steps
    last = st.step == plan.total_steps
    want_ckpt = not w.local_mode and (
        (ckpt_every and st.step % ckpt_every == 0) or last
        or (st.step % plan.steps_per_epoch == 0 and plan.epoch_checkpoints))
    log_now = st.step % cfg.log_every_steps == 0 or last
    if want_ckpt or log_now:
        st.metrics = w.progress.flush(st.step)
        if log_now:
            w.progress.print_line(st.metrics)
        # Only checkpoints are reported to Ray Train, log lines are not: a worker's report waits in a
        # one-slot queue that the controller empties once per health check (every 2 s in Ray 2.60), so
        # reporting every logged step capped training at one step per 2 s (measured: tiny T5 steps of 0.1 s
        # took 2 s at log_every_steps=1). The log file, the console line and MLflow carry the metrics.
        if want_ckpt:
            _save_checkpoint(w.engine, config, plan, st.step, st.metrics, w.progress, w.rank, st.best)
            st.last_ckpt = st.step


def _run_epoch(w: _Worker, config: dict, st: _State) -> None:
    """Train on one epoch's micro-batches (after skipping those a resumed run already trained on)."""
    accum, seen, micro, finished = w.cfg.grad_accum, 0, [], False
    for batch in _epoch_batches(w, config, st.epoch):
        seen += 1
        if st.skip:
            st.skip -= 1
            continue
        if finished:
            continue  # drain the epoch's leftovers (< grad_accum micro-batches) so ranks stay in step
        micro.append(batch)
        if len(micro) < accum:
            continue
        lr = w.engine.lr()  # the lr this step uses (the scheduler moves on in engine.step)
        loss, gnorm = _train_step(w.engine, w.task, micro, st.step, w.world, w.progress)
        micro = []
        st.step += 1
        _after_step(w, config, st, loss, gnorm, lr)
        if st.step >= w.plan.total_steps:
            return
        finished = st.step % w.plan.steps_per_epoch == 0
    if not finished:
        raise RuntimeError(
            f"rank {w.rank}: the data shard ended after {seen} micro-batches in epoch {st.epoch}, "
            f"expected {w.plan.micro_per_epoch} ({w.plan.rows_per_rank} rows / batch {w.cfg.batch_size})")


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (also run in-process when num_workers == 0): set up, resume,
    train epoch by epoch, export."""
    w = _setup_worker(config)
    st = _resume_state(w, config)
    while st.step < w.plan.total_steps:
        _run_epoch(w, config, st)
        st.epoch += 1
    if st.metrics is None:  # resumed at the last step: nothing trained in this attempt
        st.metrics = w.progress.flush(st.step)
    # throughput as of the last step (the final checkpoint's I/O is not training time)
    _export(w.engine, w.task, config, w.plan, st.metrics, w.progress, w.rank, w.world, st.last_ckpt == st.step,
            st.best if config["validate_every"] else None)


def _export(engine, task: TrainTask, config: dict, plan: Plan, metrics: dict, progress: Progress, rank: int,
            world: int, have_final_ckpt: bool, best: Optional[_Best] = None) -> None:
    """The trained fp32 weights (with validation: the best step's) as a `save_pretrained` directory
    (rank 0), plus the train summary."""
    import ray.train

    ckpt_dir_ctx = None
    engine.gather_master_weights()  # a collective where the fp32 masters are partitioned (bf16 ZeRO-0)
    if engine.name == "deepspeed":
        if not have_final_ckpt:
            raise RuntimeError("DeepSpeed export needs a checkpoint of the final step")
        if world > 1:
            dist.barrier()  # every rank's shard has been uploaded before rank 0 reads them back
        ckpt_dir_ctx = ray.train.get_checkpoint().as_directory() if rank == 0 else None
    out = config["output_dir"]
    if ckpt_dir_ctx is not None:
        with ckpt_dir_ctx as d:
            model = engine.export_model(task.build_model, config["model_config"], d, rank)
            _write_export(task, model, out)
    else:
        model = engine.export_model(task.build_model, config["model_config"], None, rank)
        if rank == 0:
            if best is not None and best.state is not None:
                model.load_state_dict(best.state)  # the best-validating step, not the last
            _write_export(task, model, out)
    if rank == 0:
        _write_summary(config, plan, metrics, progress, engine.name, world, best)
    if world > 1:
        dist.barrier()


def _write_summary(config: dict, plan: Plan, metrics: dict, progress: Progress, strategy: str, world: int,
                   best: Optional[_Best] = None) -> None:
    losses = [e["loss"] for e in progress.log]
    tail = losses[-min(10, len(losses)):] if losses else [float("nan")]
    summary = {"steps": len(progress.log), "final_loss": float(np.mean(tail)),
               "samples_per_s": metrics["samples_per_s"], "tokens_per_s": metrics["tokens_per_s"],
               "train_time_s": metrics["train_time_s"], "strategy": strategy, "world": world,
               "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch, "n_rows": plan.n_rows,
               # what produced these weights (the checkpoint fingerprint's inputs): config, seed, digests
               "fingerprint": config["fingerprint"], "config": config["weight_inputs"]}
    if "mfu" in metrics:
        summary["mfu"] = metrics["mfu"]
    if best is not None:
        summary.update(exported_step=best.step, best_val_accuracy=best.score,
                       val_accuracy={e["step"]: e["val_accuracy"] for e in progress.log if "val_accuracy" in e})
    io.write_json(io.join(config["output_dir"], SUMMARY_FILE), summary)


def _write_export(task: TrainTask, model: torch.nn.Module, out: str) -> None:
    """export_fn writes to a local directory; URIs get a local staging dir and an upload."""
    model.eval()
    if not io.is_uri(out):
        os.makedirs(out, exist_ok=True)
        task.export_fn(model, out)
        return
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory(prefix="kard_export_") as tmp:
        task.export_fn(model, tmp)
        fs, path = io.resolve(out)
        pafs.copy_files(tmp, path, destination_filesystem=fs)


# ------------------------------------------------------------------------------------------------
# the driver


def latest_checkpoint_meta(run_path: str) -> Optional[dict]:
    """meta.json of the newest `checkpoint_step*` under a Ray Train run directory, or None."""
    if not io.exists(run_path):
        return None
    fs, root = io.resolve(run_path)
    import pyarrow.fs as pafs

    dirs = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root, recursive=False))
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_step"))
    for d in reversed(dirs):
        meta = io.join(run_path, d, META_FILE)
        if io.exists(meta):
            return io.read_json(meta)
    return None


def _move_aside(run_path: str) -> str:
    dest = f"{run_path}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    if io.is_uri(run_path):
        import pyarrow.fs as pafs

        fs, src = io.resolve(run_path)
        pafs.copy_files(src, io.resolve(dest)[1], source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)
    else:
        os.replace(run_path, dest)
    return dest


def _prepare_storage(run_path: str, name: str, inputs: dict, fingerprint: str, resume: bool) -> None:
    """Keep the run's checkpoints only for the identical run asked to resume; move any other aside
    (kept under `<name>.stale-<time>/`) and say why training starts from scratch."""
    meta = latest_checkpoint_meta(run_path)
    if meta is None:
        if io.exists(run_path):
            io.remove(run_path)  # Ray Train state without a checkpoint of ours: nothing to resume
        return
    if resume and meta.get("fingerprint") == fingerprint:
        say(f"[{name}] resuming the identical run from its step-{meta['step']} checkpoint")
        return
    why = describe_change(meta.get("inputs", {}), inputs) if meta.get("fingerprint") != fingerprint else \
        "asked to retrain (no --resume)"
    dest = _move_aside(run_path)
    say(f"[{name}] {why}: training from scratch (earlier checkpoints moved to {dest})")


def _scaling(cfg: TrainingConfig):
    import ray.train

    if cfg.num_workers == 0:
        return ray.train.ScalingConfig(num_workers=0)
    res: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        res["GPU"] = 1
    res.update(cfg.resources_per_worker)  # custom resources pin workers to the nodes that offer them
    return ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=res)


def train(task: TrainTask, train_ds, cfg: TrainingConfig, output_dir: str, storage_path: str, name: str,
          model_config: dict, *, seed: int = 0, resume: bool = True, shuffle: bool = True,
          fail_at_step: Optional[int] = None, data_digest: Optional[str] = None,
          validation: Optional[list[dict]] = None, validate_every: int = 0,
          validation_key: Optional[dict] = None) -> dict:
    """Train `task` on `train_ds` (a Ray Dataset of rows `task.collate_fn` understands).

    Runs TorchTrainer with `cfg.num_workers` workers (or in-process when 0), exports the final model
    to `output_dir` via `task.export_fn` (with `train_log.jsonl` and `train_summary.json` beside it),
    and returns {"steps", "final_loss", "loss_curve", "samples_per_s", "tokens_per_s", "train_time_s",
    ...}. `final_loss` is the mean of the last 10 steps' losses.

    A checkpoint under `storage_path/name` is reused only by the identical run and only when
    `resume=True`: identical means the same training section (`NOT_WEIGHT_KEYS` aside), seed, model
    config, init model files and `data_digest` (a content digest of the examples, `tree_digest`).
    Anything else moves the old checkpoints aside and trains from scratch.
    fail_at_step (or env KARD_TRAIN_FAIL_AT_STEP) makes the last rank raise once at that step.
    validation rows + validate_every=N: `task.validate_fn` scores them every N steps and at the last
    (DDP only); the export is the best step's weights and the summary names it (`exported_step`).
    validation_key: how the rows are read (part of the fingerprint: it decides which step is exported).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if cfg.strategy == "deepspeed" and cfg.num_workers == 0:
        raise ValueError("strategy=deepspeed needs num_workers >= 1 (DeepSpeed runs in Ray Train workers)")
    if cfg.use_gpu and cfg.num_workers == 0 and not torch.cuda.is_available():
        raise ValueError("use_gpu=true with num_workers=0 but the driver sees no CUDA device")
    validation = list(validation or []) if validate_every else []
    if validate_every and (task.validate_fn is None or not validation):
        raise ValueError(f"validate_every={validate_every} needs held-out rows and a TrainTask.validate_fn")
    if validate_every and cfg.strategy != "ddp":
        raise ValueError("validation during training needs strategy=ddp (each rank decodes with the whole model)")
    n_rows = train_ds.count()
    plan = make_plan(cfg, n_rows)
    inputs = weight_inputs(cfg, model_config, seed, n_rows, data_digest)
    if validate_every:  # which step is exported depends on the held-out rows and how often they are scored
        inputs["validation"] = {"every": validate_every, **(validation_key or {}), "rows": hashlib.sha256(
            json.dumps(validation, sort_keys=True, default=str).encode()).hexdigest()[:16]}
    fingerprint = fingerprint_of(inputs)
    if not io.is_uri(storage_path):
        storage_path = os.path.abspath(storage_path)
    run_path = io.join(storage_path, name)
    _prepare_storage(run_path, name, inputs, fingerprint, resume)
    if fail_at_step is None and os.environ.get(FAIL_ENV):
        fail_at_step = int(os.environ[FAIL_ENV])
    loop_config = {
        "task": task, "cfg": cfg, "plan": plan, "model_config": model_config, "output_dir": output_dir,
        "name": name, "seed": seed, "shuffle": shuffle, "local_mode": cfg.num_workers == 0,
        "fingerprint": fingerprint, "weight_inputs": inputs, "fail_at_step": fail_at_step,
        "validation": validation, "validate_every": validate_every,
        "fail_marker": io.join(run_path, f"fail_once_at_step_{fail_at_step}.marker") if fail_at_step is not None else None,
    }
    storage, storage_fs = io.train_storage(storage_path)  # a URI's endpoint/region reach Ray Train too
    run_config = ray.train.RunConfig(
        name=name, storage_path=storage, storage_filesystem=storage_fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints))
    if shuffle:
        # Examples arrive grouped (sorted by question, so an entity's questions sit side by side); a small
        # student then learns shortcuts ("copy option A") from entity-correlated batches. One seeded global
        # shuffle spreads them over the ranks; each epoch then reshuffles each rank's share (_epoch_batches).
        train_ds = train_ds.random_shuffle(seed=seed)
    # Blocks reach the workers in a fixed order (Ray Data otherwise hands them out as tasks finish), so
    # one seed gives one data order and, on one worker, one trained model: a rerun reproduces a result.
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    # The iterator a worker reads also orders its collated batches by the dataset's own context (its
    # collate thread pool otherwise hands batches over as they finish), and in local mode the DataConfig
    # does not reach the loop at all: the dataset itself must preserve order too.
    train_ds.context.execution_options.preserve_order = True
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=_scaling(cfg),
                           run_config=run_config, datasets={"train": train_ds},
                           dataset_config=_ordered_split_config(ingest))
    trainer.fit()
    return read_result(output_dir)


def ordered(ds):
    """`ds` executing with preserve_order: its blocks come out in input order, not in the order its tasks
    finish. Every dataset a training reads goes through it before it is materialised: a seeded shuffle
    of blocks that arrive in a load-dependent order is not reproducible (two runs of one config trained
    on different batches from step 1)."""
    ds.context.execution_options.preserve_order = True
    return ds


def _ordered_split_config(ingest):
    """Ray Train's DataConfig, except that several workers get fixed shares: `Dataset.split(n, equal=True)`
    (rows in block order) instead of `streaming_split`, whose output splitter hands each block to whichever
    worker asks next, so under load rank 0 of one run and rank 0 of the next (or of a restarted worker
    group) train on different rows. Fixed shares are what makes a multi-worker run reproducible and its
    resume exact. They are materialized in the object store (the student's and reranker's tokenised
    examples are small); one worker still streams."""
    import ray.train

    class OrderedSplit(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            if world_size <= 1:
                return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, part in enumerate(ds.split(world_size, equal=True)):
                    output[i][name] = part.iterator()
            return output

    return OrderedSplit(execution_options=ingest)


def read_result(output_dir: str) -> dict:
    """The dict `train()` returns, read back from `<output_dir>` (summary + per-step log)."""
    summary = io.read_json(io.join(output_dir, SUMMARY_FILE))
    log = read_train_log(io.join(output_dir, LOG_FILE))
    summary["loss_curve"] = [e["loss"] for e in log]
    return summary

