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
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from kard_ray import io
from kard_ray.config import TrainingConfig
from kard_ray.training.engines import make_engine
from kard_ray.training.progress import Progress, emit, read_train_log

N_KEY = "_n_items"  # added to every collated batch by the core (popped before loss_fn sees it)
LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"
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
    """

    build_model: Callable[[dict], torch.nn.Module]
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor], int], tuple[torch.Tensor, int]]
    collate_fn: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]]
    export_fn: Callable[[torch.nn.Module, str], None]
    count_fn: Optional[Callable[[dict[str, torch.Tensor]], int]] = None
    flops_per_token: Optional[Callable[[torch.nn.Module], float]] = None
    find_unused_parameters: bool = False


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
    fingerprint: str


def make_plan(cfg: TrainingConfig, n_rows: int, model_config: dict) -> Plan:
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
    key = {k: getattr(cfg, k) for k in ("strategy", "zero_stage", "num_workers", "batch_size", "grad_accum", "lr",
                                          "weight_decay", "schedule", "warmup_steps", "max_grad_norm", "epochs",
                                          "max_steps")}
    blob = json.dumps({"cfg": key, "rows": n_rows, "model": model_config}, sort_keys=True, default=str)
    return Plan(n_rows, world, rows_per_rank, micro, spe, total, cfg.batch_size * cfg.grad_accum * world,
                epoch_checkpoints=cfg.max_steps is None,
                fingerprint=hashlib.sha256(blob.encode()).hexdigest()[:16])


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
            with torch.autocast("cuda", dtype=torch.bfloat16) if engine.autocast else contextlib.nullcontext():
                loss, n_tokens = task.loss_fn(engine.module, batch, step)
            weighted = loss.float() * weights[i]
            engine.backward(weighted)
        step_loss += weighted.detach()
        progress.add_tokens(n_tokens)
    return step_loss, engine.step()


def _save_checkpoint(engine, config: dict, plan: Plan, step: int, metrics: dict, progress: Progress,
                     rank: int) -> None:
    """Every rank writes its part (DeepSpeed shard, RNG state) to a temp dir and reports it; Ray Train
    merges the ranks' files into one checkpoint directory and keeps the last K."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="kard_ckpt_")
    try:
        engine.save(tmp, rank)
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        if rank == 0:
            meta = {"step": step, "fingerprint": plan.fingerprint, "log": progress.log,
                    "train_time_s": metrics["train_time_s"], "strategy": engine.name, "world": plan.world}
            with open(os.path.join(tmp, "meta.json"), "w") as fh:
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


def _restore(engine, plan: Plan, rank: int):
    """(start_step, log, prior_train_time_s) from the latest checkpoint, or None to start fresh."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        meta_path = os.path.join(d, "meta.json")
        if not os.path.exists(meta_path):
            raise RuntimeError(f"checkpoint {ckpt.path} has no meta.json: not written by kard_ray.training")
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("fingerprint") != plan.fingerprint:
            # Same run name, different data/config: resuming would mix two runs.
            if rank == 0:
                emit(f"[train] checkpoint {ckpt.path} belongs to another configuration; starting from step 0", True)
            return None
        engine.load(d)
        rng = os.path.join(d, f"rng_rank{rank}.pt")
        if os.path.exists(rng):
            _set_rng_state(torch.load(rng, weights_only=False))
    if rank == 0:
        emit(f"[train] resumed from {ckpt.path} at step {meta['step']}", True)
    return int(meta["step"]), list(meta["log"]), float(meta.get("train_time_s", 0.0))


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function (also run in-process when num_workers == 0)."""
    import ray.train

    task: TrainTask = config["task"]
    cfg: TrainingConfig = config["cfg"]
    plan: Plan = config["plan"]
    local_mode = config["local_mode"]
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

    restored = _restore(engine, plan, rank)
    start_step, log, prior_time = restored if restored else (0, [], 0.0)
    output_dir = config["output_dir"]
    if rank == 0 and restored is None and io.exists(output_dir):
        io.remove(output_dir)  # fresh run: no stale model files or log next to the new ones
    progress = Progress(name=config["name"], rank=rank, world=world, total_steps=plan.total_steps,
                        samples_per_step=plan.samples_per_step, log_path=io.join(output_dir, LOG_FILE),
                        log_every=cfg.log_every_steps, device=device, flops_per_token=fpt,
                        start_step=start_step, log=log, prior_train_time_s=prior_time, raw_stdout=not local_mode)

    shard = ray.train.get_dataset_shard("train")
    collate = _collate_class()(task.collate_fn, task.count_fn)
    spe, accum = plan.steps_per_epoch, cfg.grad_accum
    step = start_step
    epoch = step // spe
    skip = (step % spe) * accum  # micro-batches of the current epoch already trained on
    last_ckpt = step if restored else -1
    ckpt_every = 0 if local_mode else cfg.checkpoint_every_steps
    metrics = None

    while step < plan.total_steps:
        it = shard.iter_torch_batches(
            batch_size=cfg.batch_size, collate_fn=collate, device=device, drop_last=True, prefetch_batches=2,
            pin_memory=device.type == "cuda",
            local_shuffle_buffer_size=max(cfg.batch_size * 8, 256) if config["shuffle"] else None,
            local_shuffle_seed=config["seed"] + epoch if config["shuffle"] else None)
        micro: list[dict] = []
        seen = 0
        finished_epoch = False
        for batch in it:
            seen += 1
            if skip:
                skip -= 1
                continue
            if finished_epoch:
                continue  # drain the epoch's leftovers (< grad_accum micro-batches) so ranks stay in step
            micro.append(batch)
            if len(micro) < accum:
                continue
            lr = engine.lr()  # the lr this step uses (the scheduler moves on in engine.step)
            loss, gnorm = _train_step(engine, task, micro, step, world, progress)
            micro = []
            step += 1
            progress.record(step, epoch, loss, gnorm, lr)
            _maybe_fail(config, step, rank, world)
            epoch_end = step % spe == 0
            want_ckpt = not local_mode and (
                (ckpt_every and step % ckpt_every == 0) or step == plan.total_steps
                or (epoch_end and plan.epoch_checkpoints))
            if want_ckpt or step % cfg.log_every_steps == 0 or step == plan.total_steps:
                metrics = progress.flush(step)
                if step % cfg.log_every_steps == 0 or step == plan.total_steps:
                    progress.print_line(metrics)
                if want_ckpt:
                    _save_checkpoint(engine, config, plan, step, metrics, progress, rank)
                    last_ckpt = step
                else:
                    ray.train.report(metrics)
            if step >= plan.total_steps:
                break
            if epoch_end:
                finished_epoch = True
        else:
            if not finished_epoch:
                raise RuntimeError(
                    f"rank {rank}: the data shard ended after {seen} micro-batches in epoch {epoch}, "
                    f"expected {plan.micro_per_epoch} ({plan.rows_per_rank} rows / batch {cfg.batch_size})")
        epoch += 1

    if metrics is None:  # resumed at the last step: nothing trained in this attempt
        metrics = progress.flush(step)
    # throughput as of the last step (the final checkpoint's I/O is not training time)
    _export(engine, task, config, plan, metrics, progress, rank, world, last_ckpt == step)


def _export(engine, task: TrainTask, config: dict, plan: Plan, metrics: dict, progress: Progress, rank: int,
            world: int, have_final_ckpt: bool) -> None:
    import ray.train

    ckpt_dir_ctx = None
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
            _write_export(task, model, out)
    if rank == 0:
        losses = [e["loss"] for e in progress.log]
        tail = losses[-min(10, len(losses)):] if losses else [float("nan")]
        summary = {"steps": len(progress.log), "final_loss": float(np.mean(tail)),
                   "samples_per_s": metrics["samples_per_s"], "tokens_per_s": metrics["tokens_per_s"],
                   "train_time_s": metrics["train_time_s"], "strategy": engine.name, "world": world,
                   "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch, "n_rows": plan.n_rows}
        if "mfu" in metrics:
            summary["mfu"] = metrics["mfu"]
        io.write_json(io.join(out, SUMMARY_FILE), summary)
    if world > 1:
        dist.barrier()


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


def train(task: TrainTask, train_ds, cfg: TrainingConfig, output_dir: str, storage_path: str, name: str,
          model_config: dict, *, seed: int = 0, resume: bool = True, shuffle: bool = True,
          fail_at_step: Optional[int] = None) -> dict:
    """Train `task` on `train_ds` (a Ray Dataset of rows `task.collate_fn` understands).

    Runs TorchTrainer with `cfg.num_workers` workers (or in-process when 0), exports the final model
    to `output_dir` via `task.export_fn` (with `train_log.jsonl` and `train_summary.json` beside it),
    and returns {"steps", "final_loss", "loss_curve", "samples_per_s", "tokens_per_s", "train_time_s",
    ...}. `final_loss` is the mean of the last 10 steps' losses.

    resume=True continues a previous run with the same `storage_path`/`name` (Ray Train restores its
    latest checkpoint; one from another configuration is ignored); resume=False deletes it first.
    fail_at_step (or env KARD_TRAIN_FAIL_AT_STEP) makes the last rank raise once at that step.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if cfg.strategy == "deepspeed" and cfg.num_workers == 0:
        raise ValueError("strategy=deepspeed needs num_workers >= 1 (DeepSpeed runs in Ray Train workers)")
    if cfg.use_gpu and cfg.num_workers == 0 and not torch.cuda.is_available():
        raise ValueError("use_gpu=true with num_workers=0 but the driver sees no CUDA device")
    n_rows = train_ds.count()
    plan = make_plan(cfg, n_rows, model_config)
    if not io.is_uri(storage_path):
        storage_path = os.path.abspath(storage_path)
    run_path = io.join(storage_path, name)
    if not resume and io.exists(run_path):
        io.remove(run_path)
    if fail_at_step is None and os.environ.get(FAIL_ENV):
        fail_at_step = int(os.environ[FAIL_ENV])
    local_mode = cfg.num_workers == 0
    loop_config = {
        "task": task, "cfg": cfg, "plan": plan, "model_config": model_config, "output_dir": output_dir,
        "name": name, "seed": seed, "shuffle": shuffle, "local_mode": local_mode,
        "fail_at_step": fail_at_step, "fail_marker": io.join(run_path, f"fail_once_at_step_{fail_at_step}.marker")
        if fail_at_step is not None else None,
    }
    if local_mode:
        scaling = ray.train.ScalingConfig(num_workers=0)
    else:
        res: dict[str, float] = {"CPU": cfg.cpus_per_worker}
        if cfg.use_gpu:
            res["GPU"] = 1
        res.update(cfg.resources_per_worker)  # custom resources pin workers to the nodes that offer them
        scaling = ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=res)
    storage, storage_fs = io.train_storage(storage_path)  # a URI's endpoint/region reach Ray Train too
    run_config = ray.train.RunConfig(
        name=name, storage_path=storage, storage_filesystem=storage_fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints))
    if shuffle:
        # Examples arrive grouped (sorted by question, so an entity's questions sit side by side); the
        # per-epoch local shuffle buffer alone leaves each batch dominated by a few entities, and a small
        # student then learns shortcuts ("copy option A") instead of reading its passages. One seeded
        # global shuffle makes batches i.i.d.; the same seed gives the same order on resume.
        train_ds = train_ds.random_shuffle(seed=seed)
    # Blocks reach the workers in a fixed order (Ray Data otherwise hands them out as tasks finish), so
    # one seed gives one data order and, on one worker, one trained model: a rerun reproduces a result.
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, datasets={"train": train_ds},
                           dataset_config=ray.train.DataConfig(execution_options=ingest))
    trainer.fit()
    return read_result(output_dir)


def read_result(output_dir: str) -> dict:
    """The dict `train()` returns, read back from `<output_dir>` (summary + per-step log)."""
    summary = io.read_json(io.join(output_dir, SUMMARY_FILE))
    log = read_train_log(io.join(output_dir, LOG_FILE))
    summary["loss_curve"] = [e["loss"] for e in log]
    return summary

