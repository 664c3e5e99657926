"""Teacher backends: where rationale texts come from. `make_backend(cfg, run)` picks one.

Each backend says which samples a question should have (`expected`) and turns the questions still
to do into a Ray Data dataset of GEN_SCHEMA rows, one per sample (`dataset`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kard_ray.config import KardConfig
from kard_ray.io import RunDir
from kard_ray.teacher.backends.common import GEN_SCHEMA, gen_row
from kard_ray.teacher.importers import TeacherRecord, load_teacher_records
from kard_ray.console import say


@dataclass
class Backend:
    name: str
    cfg: KardConfig

    def expected(self, questions: list[dict]) -> dict[str, list[int]]:
        n = self.cfg.teacher.n_samples
        return {q["id"]: list(range(n)) for q in questions}

    def dataset(self, todo: list[dict]):
        raise NotImplementedError

    def _question_dataset(self, todo: list[dict], batch_size: int):
        import ray

        # One block per batch: each finished block is written as a part as soon as it arrives.
        return ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / batch_size)))


@dataclass
class ImportBackend(Backend):
    """Existing teacher output (`import`), or the synthetic task's file (`synthetic`)."""

    path: str = ""
    records: dict[str, TeacherRecord] = field(default_factory=dict)

    def __post_init__(self):
        from kard_ray import io

        if not io.exists(self.path):
            hint = ("run the questions stage first (it writes the synthetic task's rationales)"
                    if self.name == "synthetic" else "check teacher.import_path")
            raise FileNotFoundError(f"teacher.backend={self.name}: {self.path} not found; {hint}")
        self.records = load_teacher_records(self.path)

    def expected(self, questions: list[dict]) -> dict[str, list[int]]:
        # Up to n_samples of what the file holds; a question the file lacks expects nothing.
        n = self.cfg.teacher.n_samples
        ids = {q["id"] for q in questions}
        missing = len(ids - set(self.records))
        unknown = len(set(self.records) - ids)
        if missing or unknown:
            say(f"[teacher] {self.path}: {missing} training questions have no rationales there; "
                f"{unknown} of its ids are not training questions (ignored)")
        return {q["id"]: list(range(min(n, len(self.records[q["id"]].texts))))
                for q in questions if q["id"] in self.records}

    def dataset(self, todo: list[dict]):
        import ray

        rows = []
        for q in todo:
            rec = self.records[q["question_id"]]
            for s in q["samples"]:
                rows.append(gen_row(q, s, rec.texts[s], rec.teacher or self.name,
                                    rec.prompt_tokens[s], rec.completion_tokens[s]))
        blocks = max(1, min(32, math.ceil(len(rows) / 2000)))
        return ray.data.from_arrow(_chunks(rows, blocks))


def _chunks(rows: list[dict], k: int):
    import pyarrow as pa

    # Whole questions per chunk, so every block holds complete questions (rows are grouped by question).
    size = math.ceil(len(rows) / k)
    out, start = [], 0
    while start < len(rows):
        end = min(len(rows), start + size)
        while end < len(rows) and rows[end]["question_id"] == rows[end - 1]["question_id"]:
            end += 1
        out.append(pa.Table.from_pylist(rows[start:end], schema=GEN_SCHEMA))
        start = end
    return out or [GEN_SCHEMA.empty_table()]


@dataclass
class OpenAIBackend(Backend):
    def dataset(self, todo: list[dict]):
        from kard_ray.teacher.backends.openai_http import OpenAIChatUDF, openai_stage_kwargs

        kwargs = openai_stage_kwargs(self.cfg)  # fails fast when the API key variable is unset
        return self._question_dataset(todo, self.cfg.teacher.openai.batch_size).map_batches(OpenAIChatUDF, **kwargs)


@dataclass
class OpenAIBatchBackend(Backend):
    """The Batch API runs in the driver (no Ray Data): `run_batches` writes rows as batches finish."""

    run_dir: RunDir | None = None

    def run_batches(self, todo: list[dict], write) -> dict:
        from kard_ray.teacher.backends.openai_batch import OpenAIBatchRunner

        return OpenAIBatchRunner(self.cfg, self.run_dir).run(todo, write)


@dataclass
class HFBackend(Backend):
    def dataset(self, todo: list[dict]):
        from kard_ray.teacher.backends.hf import HFGenerateUDF, hf_stage_kwargs

        return self._question_dataset(todo, self.cfg.teacher.hf.batch_size).map_batches(HFGenerateUDF, **hf_stage_kwargs(self.cfg))


@dataclass
class VLLMBackend(Backend):
    def dataset(self, todo: list[dict]):
        from kard_ray.teacher.backends.vllm import vllm_generate

        return vllm_generate(self._question_dataset(todo, self.cfg.teacher.vllm.batch_size), self.cfg)


def make_backend(cfg: KardConfig, run: RunDir) -> Backend:
    b = cfg.teacher.backend
    if b == "import":
        return ImportBackend("import", cfg, path=cfg.teacher.import_path)
    if b == "synthetic":
        from kard_ray.data.stage import synthetic_inputs

        return ImportBackend("synthetic", cfg, path=synthetic_inputs(run)["rationales"])
    if b == "openai":
        return OpenAIBackend("openai", cfg)
    if b == "openai_batch":
        return OpenAIBatchBackend("openai_batch", cfg, run_dir=run)
    if b == "hf":
        return HFBackend("hf", cfg)
    if b == "vllm":
        return VLLMBackend("vllm", cfg)
    raise ValueError(f"teacher.backend: unknown backend {b!r}")
