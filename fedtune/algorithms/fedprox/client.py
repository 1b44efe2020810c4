"""FedProx client: FedAvg's LoRA client whose training adds the proximal gradient μ (w − w_g) at every step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedtune.algorithms.fedavg import LoRAClient
from fedtune.training.loop import StepHook


def proximal(mu: float) -> StepHook:
    """The step hook of (μ/2)·‖w − w_g‖²: w_g is the trainable parameters as training starts (the synced global
    adapter, or each client's slice of the stacked factors in a batched round); every step adds μ (w − w_g) to
    each gradient, after clipping / DP noise and before the update."""

    def attach(params: list[nn.Parameter]):
        anchors = [p.detach().clone() for p in params]

        @torch.no_grad()
        def step() -> None:
            for p, w_g in zip(params, anchors, strict=True):
                if p.grad is not None:
                    p.grad.add_(p - w_g, alpha=mu)

        return step

    return attach


class FedProxClient(LoRAClient):
    def step_hooks(self, config: dict[str, Any]) -> tuple[StepHook, ...]:
        mu = float(config.get("mu", 0.0))
        return (proximal(mu),) if mu > 0 else ()  # μ = 0: nothing added, the FedAvg step bit for bit
