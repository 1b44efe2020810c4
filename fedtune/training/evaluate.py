"""Evaluation: the mean token cross-entropy of a model over response tokens (what training minimises)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fedtune.data.format import IGNORE, collate
from fedtune.models.hardware import model_device, to_device


@torch.no_grad()
def evaluate(model: nn.Module, features: Sequence[dict], *, pad_id: int, batch_size: int = 16) -> float:
    """Mean token-level cross-entropy over the response tokens of `features` (nan if empty)."""
    if not features:
        return math.nan
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model_device(model)
    for i in range(0, len(features), batch_size):
        batch = to_device(collate(features[i : i + batch_size], pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # shift: token t predicts t+1; (B, T-1, V) vs (B, T-1)
        lg, lb = logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=IGNORE, reduction="sum")
        total += nll.item()
        count += int((lb != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)
