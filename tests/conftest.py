"""Shared fixtures: one local Ray instance per test session, tiny offline models, the synthetic task.

Everything is built locally (no hub downloads): HF_HUB_OFFLINE is set before transformers loads.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# The tests start their own local Ray; never join a cluster that happens to be configured.
os.environ.pop("RAY_ADDRESS", None)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KARD_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real StrategyQA files in ../shared/data; tests that need them skip on a user's clone."""
    d = SHARED_DATA / "strategyqa"
    if not (d / "train.jsonl").exists():
        pytest.skip(f"shared data not found at {d} (it ships beside the repo for CI, not in it); "
                    "set KARD_SHARED_DATA to its data/ folder to run this test")
    return d


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session.

    4 logical CPUs on a 2-core machine: Ray Data deadlocks when an actor pool takes every CPU
    (the read task cannot be scheduled; RAY_NOTES.md, ray#44687).
    """
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a cluster another process left on the machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_cfg():
    from kard_ray.config import SyntheticConfig

    return SyntheticConfig(n_train_entities=40, n_test_entities=10, rationales_per_question=2, seed=7)


@pytest.fixture(scope="session")
def synthetic_task(synthetic_cfg):
    from kard_ray.data.synthetic import make_task

    return make_task(synthetic_cfg)


@pytest.fixture(scope="session")
def tiny_cfg():
    from kard_ray.config import TinyModelConfig

    return TinyModelConfig(d_model=64, n_layers=1, n_heads=2, d_ff=128, vocab_size=1000)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, synthetic_task, tiny_cfg) -> str:
    """A tiny T5 + BPE tokenizer trained on the synthetic task, saved with save_pretrained."""
    from kard_ray.data.synthetic import task_texts
    from kard_ray.models import save_tiny_model

    return save_tiny_model("t5", task_texts(synthetic_task), tiny_cfg, str(tmp_path_factory.mktemp("tiny_t5")))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, synthetic_task, tiny_cfg) -> str:
    """A tiny BERT encoder + tokenizer (reranker / embedder tests)."""
    from kard_ray.data.synthetic import task_texts
    from kard_ray.models import save_tiny_model

    return save_tiny_model("bert", task_texts(synthetic_task), tiny_cfg, str(tmp_path_factory.mktemp("tiny_bert")))


# The demo at test size (configs/demo.yaml with fewer entities and steps): RD and KARD students, the
# reranker, evaluation. Shared by the pipeline tests (the KARD effect, artifacts, stage skipping) and the
# Serve tests (served answers equal these offline predictions), so the suite trains it once.
DEMO_TEST_OVERRIDES = [
    "methods=[rd,kard_bm25,kard_reranker]",
    "data.synthetic.n_test_entities=25",
    "student.max_steps=1500",
    "student.checkpoint_every_steps=0",
    "reranker.max_steps=100",
    "eval.oracle=false",
]


@pytest.fixture(scope="session")
def demo_run(ray_session, tmp_path_factory):
    """(config, manifest) of one finished pipeline run at test size (KARD_TEST_DEMO_RUN_DIR reuses one)."""
    from kard_ray import pipeline
    from kard_ray.config import load_config

    run_dir = os.environ.get("KARD_TEST_DEMO_RUN_DIR") or str(tmp_path_factory.mktemp("demo_run"))
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), DEMO_TEST_OVERRIDES + [f"run_dir={run_dir}"])
    manifest = pipeline.run(cfg)
    return cfg, manifest
