"""Evaluation: every method's test predictions and metrics (`evaluate`), the reranker's Hits@k (`reranker`)."""

from kard_ray.evaluation.evaluate import evaluate, method_metrics, wilson_interval

__all__ = ["evaluate", "method_metrics", "wilson_interval"]
