"""The one first-order training loop: AdamW over the trainable parameters (LoRA A/B, Fed-SB R, ...).

A plain torch loop (as readable as a peft example) with seeded batch order, gradient accumulation and
clipping. Each call builds a fresh optimiser: local optimiser state does not persist across rounds (FedIT).
What varies is said by the caller: sample-level DP supplies its own `Steps` (opacus' sampler, per-example loss
and DPOptimizer: fedtune.privacy.sample), a method adds step hooks (FedProx's proximal gradient). The batched
multi-client loop (fedtune.training.batched) takes the same hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedtune.data.format import collate
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


# A hook: called once with the trainable parameters before the first step, it returns what runs at every step after
# the step's gradient is final (clipped; under DP also noised) and before the optimiser updates (e.g. FedProx adds
# μ(w − w_g) to each gradient). A data-independent term enters here as its exact gradient rather than as a loss term:
# under DP, opacus builds the gradient from per-example gradients only and overwrites .grad, so a loss term that
# does not go through the model's layers would be silently dropped.
StepHook = Callable[[list[nn.Parameter]], Callable[[], None]]


def run_hooks(hooks: Sequence[StepHook], params: list[nn.Parameter]) -> Callable[..., None]:
    """An optimiser step pre-hook (torch.optim.Optimizer.register_step_pre_hook) that runs every hook's step: on the
    AdamW itself it runs after clipping and, under opacus' DPOptimizer, after the noise."""
    callbacks = [hook(params) for hook in hooks]

    def pre_step(*_) -> None:
        for cb in callbacks:
            cb()

    return pre_step


@dataclass
class Steps:
    """What one run of the loop steps with: the module the forwards go through, the optimiser whose step updates,
    the AdamW itself (hooks attach to it, so they run after clipping and DP noise), each step's micro-batches, and
    the loss of one micro-batch."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    inner: torch.optim.Optimizer
    micro_batches: Iterator[list[dict[str, torch.Tensor]]]  # one list per optimiser step
    # (module, micro-batch, micro-batches in its step) → (what to backward, the micro-batch's mean loss for the record)
    loss: Callable[[nn.Module, dict[str, torch.Tensor], int], tuple[torch.Tensor, float]]
    clip: float = 0.0  # global-norm gradient clip before each step (0: none; DP clips per example instead)
    on_empty: Callable[[], None] | None = None  # a step with no examples (DP's empty Poisson batch)


StepsFactory = Callable[[nn.Module, list[nn.Parameter], Sequence[dict], LocalTrainConfig, int],
                        AbstractContextManager[Steps]]


@contextmanager
def plain_steps(model: nn.Module, params: list[nn.Parameter], features: Sequence[dict], cfg: LocalTrainConfig,
                pad_id: int) -> Iterator[Steps]:
    """AdamW on seeded shuffled batches, `grad_accum` micro-batches per step, the batch-mean loss, global-norm
    clipping to cfg.max_grad_norm."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stream = batches(features, cfg.batch_size, cfg.seed, pad_id)

    def loss(module: nn.Module, batch: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, float]:
        out = module(**batch).loss
        return out / n, out.item()

    yield Steps(model, opt, opt, ([next(stream) for _ in range(cfg.grad_accum)] for _ in range(cfg.steps)), loss,
                clip=cfg.max_grad_norm)


def train_local(
    model: nn.Module,
    features: Sequence[dict],
    cfg: LocalTrainConfig,
    *,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
    hooks: Sequence[StepHook] = (),
    steps: StepsFactory = plain_steps,
) -> TrainResult:
    """The one first-order loop: cfg.steps optimiser steps on the model's trainable parameters, as `steps` says
    (plain AdamW, or fedtune.privacy.sample's DP-SGD); each `hooks` entry runs at every step between the final
    gradient and the update."""
    params = trainable_parameters(model)
    device = model_device(model)
    losses: list[float] = []
    seen = 0
    with steps(model, params, features, cfg, pad_id) as s:
        handle = s.inner.register_step_pre_hook(run_hooks(hooks, params)) if hooks else None
        model.train()
        try:
            for step, micro in enumerate(s.micro_batches):
                for batch in micro:
                    batch = to_device(batch, device)
                    loss, mean = s.loss(s.module, batch, len(micro))
                    loss.backward()
                    losses.append(mean)
                    seen += batch["input_ids"].shape[0]
                if not micro and s.on_empty is not None:
                    s.on_empty()
                if s.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, s.clip)
                s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
                if on_step is not None:
                    on_step(step, losses[-1] if micro else float("nan"))  # nan: an empty (DP Poisson) batch
        finally:
            if handle is not None:
                handle.remove()
            model.eval()
    mean = sum(losses) / len(losses) if losses else float("nan")
    return TrainResult(loss=mean, steps=cfg.steps, examples_seen=seen, losses=losses)
