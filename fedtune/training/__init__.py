"""Local training: the one first-order loop (loop.py) and its batched multi-client form (batched.py), zeroth-order
primitives (zo.py), and evaluation."""

from fedtune.training.evaluate import evaluate
from fedtune.training.loop import LocalTrainConfig, TrainResult, batches, train_local

__all__ = ["LocalTrainConfig", "TrainResult", "batches", "evaluate", "train_local"]
