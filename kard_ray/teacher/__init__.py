"""Teacher rationales (KARD.md §1): prompts, generation backends on Ray Data, answer parsing,
consistency / verifier filtering, resumable parquet output.

    stats = generate_rationales(cfg, RunDir(cfg.run_dir))
    parse_answer("Therefore, the answer is (B) no.", ["yes", "no"])  # -> 1
"""

from kard_ray.teacher.generate import generate_rationales
from kard_ray.teacher.importers import load_teacher_rationales
from kard_ray.teacher.kept import kept_rationales
from kard_ray.teacher.parsing import parse_answer, parse_prediction
from kard_ray.teacher.prompts import build_messages

__all__ = ["generate_rationales", "parse_answer", "parse_prediction", "build_messages", "load_teacher_rationales", "kept_rationales"]
