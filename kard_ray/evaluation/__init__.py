"""Evaluation: batch inference over Ray Data, metrics, result tables and plots."""

from kard_ray.evaluation.evaluate import evaluate, method_metrics, question_query, wilson_interval
from kard_ray.evaluation.generator import StudentGenerator

__all__ = ["evaluate", "method_metrics", "question_query", "wilson_interval", "StudentGenerator"]
