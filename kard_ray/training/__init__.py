"""Ray Train trainer core (DDP / DeepSpeed ZeRO, checkpoints, resume, progress) and the model
families trained with it: the seq2seq student (`student.py`) and the passage reranker (`reranker*.py`).

    from kard_ray.training.core import TrainTask, train
"""

from kard_ray.training.core import TrainTask, read_result, train

__all__ = ["TrainTask", "read_result", "train"]
