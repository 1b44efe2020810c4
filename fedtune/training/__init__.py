"""Local training: the first-order trainer for LoRA-style adapters, and evaluation."""

from fedtune.training.local import LocalTrainConfig, TrainResult, batches, evaluate, train_local

__all__ = ["LocalTrainConfig", "TrainResult", "batches", "evaluate", "train_local"]
