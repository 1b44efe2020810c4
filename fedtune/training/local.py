"""Local first-order trainer: AdamW over the trainable parameters (LoRA A/B, Fed-SB R, ...).

A plain torch loop (as readable as a peft example) with seeded batch order, gradient accumulation and
clipping. Each call builds a fresh optimiser: local optimiser state does not persist across rounds (FedIT).
Sample-level DP swaps the optimiser and the batch sampler for opacus' (fedtune.privacy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedtune.data.format import IGNORE, collate
from fedtune.models.hardware import model_device, to_device


@dataclass
class LocalTrainConfig:
    steps: int = 10  # optimiser steps per round
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LocalTrainConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class TrainResult:
    loss: float  # mean training loss over the round's micro-batches
    steps: int
    examples_seen: int
    losses: list[float] = field(default_factory=list)


def batches(features: Sequence[dict], batch_size: int, seed: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded stream of shuffled batches (reshuffled each epoch)."""
    if not features:
        raise ValueError("no training examples for this client")
    g = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(features))
    while True:
        order = torch.randperm(len(features), generator=g).tolist()
        for i in range(0, len(order) - bs + 1, bs):
            yield collate([features[j] for j in order[i : i + bs]], pad_id)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; was the adapter attached?")
    return params


def train_local(
    model: nn.Module,
    features: Sequence[dict],
    cfg: LocalTrainConfig,
    *,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """cfg.steps optimiser steps of AdamW on the model's trainable parameters."""
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stream = batches(features, cfg.batch_size, cfg.seed, pad_id)
    device = model_device(model)
    model.train()
    losses: list[float] = []
    seen = 0
    for step in range(cfg.steps):
        for _ in range(cfg.grad_accum):
            batch = to_device(next(stream), device)
            loss = model(**batch).loss
            (loss / cfg.grad_accum).backward()
            losses.append(loss.item())
            seen += batch["input_ids"].shape[0]
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return TrainResult(loss=sum(losses) / len(losses), steps=cfg.steps, examples_seen=seen, losses=losses)


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
