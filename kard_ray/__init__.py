"""kard-ray: Knowledge-Augmented Reasoning Distillation (Kang et al., NeurIPS 2023) on Ray.

Pipeline: knowledge (corpus → passages → BM25 / dense index) → teacher (rationales) → student and
reranker distillation (Ray Train) → evaluation (Ray Data) → serving (Ray Serve).
"""

__version__ = "0.1.0"
