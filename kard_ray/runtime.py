"""Starting or joining Ray the same way in every job, embedded or under `ray job submit`."""

from __future__ import annotations

import logging
import os

from kard_ray.config import KardConfig

log = logging.getLogger("kard_ray")
_started_here = False  # whether init_ray started the Ray instance (embedded) rather than joining one


def started_ray_here() -> bool:
    """True when this process started its own Ray (its log files are on this machine, the run's to keep)."""
    return _started_here


def init_ray(cfg: KardConfig):
    """`ray.init()` that joins the job's cluster when there is one, else starts a local instance.

    Under `ray job submit` (or with RAY_ADDRESS / resources.address set) Ray is joined as it is —
    passing num_cpus to an existing cluster is an error. Embedded, `resources.num_cpus` logical CPUs
    are declared: more than the cores on a small machine keeps Ray Data actor pools from starving the
    read tasks (RAY_NOTES.md, ray#44687).
    """
    import ray

    from kard_ray.console import is_verbose, routing_active

    global _started_here
    if ray.is_initialized():
        return ray
    # Quiet by default (progress comes from the pipeline's own lines); users can set these themselves.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS_", "TOKENIZERS_"))}
    runtime_env = {"env_vars": env} if env else None
    address = cfg.resources.address or os.environ.get("RAY_ADDRESS")
    # Quiet, workers' stdout/stderr stay in Ray's log files; kard-ray's own lines come through the
    # console relay (kard_ray.console).
    log_to_driver = is_verbose()
    # INFO when a run's console session files Ray's logs (its console handlers then show errors only)
    level = logging.INFO if routing_active() else logging.WARNING
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=level, log_to_driver=log_to_driver)
    else:
        # "local": start our own instance even if `ray start` left a cluster on this machine (a bare
        # ray.init() would join that one, and then refuse num_cpus). Set resources.address to join it.
        ray.init(address="local", num_cpus=cfg.resources.num_cpus, runtime_env=runtime_env, include_dashboard=False,
                 logging_level=level, log_to_driver=log_to_driver)
        _started_here = True
    configure_data_context()
    return ray


def configure_data_context() -> None:
    """The Ray Data settings of every kard-ray driver (the context travels with each dataset's tasks)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(os.environ.get("KARD_PROGRESS_BARS"))
    # Parquet through Ray Data's V1 datasource. V2 (Ray 2.60's default) reads the files' footers on a pool
    # of FooterReader actors, new worker processes for every read_parquet: measured on this 2-core machine,
    # six reads of run tables took 2.0-4.6 s each and started 33 worker processes, against 0.13-1.3 s and 5.
    if hasattr(ctx, "use_datasource_v2"):
        ctx.use_datasource_v2 = False
