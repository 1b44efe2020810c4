"""The first-order client training step shared by LoRA-style methods (FedAvg, FLoRA, Fed-SB, FedProx, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedtune.algorithms.api import TrainContext
from fedtune.privacy.sample import SampleLevelDP
from fedtune.training.loop import LocalTrainConfig, StepHook, TrainResult, train_local


def run_local_training(
    model: nn.Module, ctx: TrainContext, config: dict[str, Any], dp: SampleLevelDP, hooks: Sequence[StepHook] = ()
) -> tuple[TrainResult, dict[str, float]]:
    """Seed, then the one first-order loop (fedtune.training.loop), as DP-SGD when config["privacy"] says
    mode = "sample"; `hooks` (a method's gradient terms) in either. Returns (result, privacy metrics: epsilon,
    delta, ... or {})."""
    cfg = LocalTrainConfig.from_dict(config)
    torch.manual_seed(cfg.seed)  # dropout and any other global-RNG use
    priv = config.get("privacy")
    if priv and priv.get("mode") == "sample":
        return dp.train(model, ctx.client_id, ctx.features, cfg, priv, pad_id=ctx.pad_id, on_step=ctx.on_step,
                        hooks=hooks)
    return train_local(model, ctx.features, cfg, pad_id=ctx.pad_id, on_step=ctx.on_step, hooks=hooks), {}
