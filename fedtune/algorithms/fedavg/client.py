"""Client of FedAvg-LoRA: load the global A/B, train them, send them back."""

from __future__ import annotations

from typing import Any

from torch import nn

from fedtune.algorithms.api import ClientAlgorithm, ClientUpdate, Payload, TensorDict, TrainContext
from fedtune.algorithms.common.lora import (
    activate,
    adapter_factors,
    attach_lora,
    fork_model,
    get_lora_state,
    lora_layers,
    set_lora_state,
)
from fedtune.algorithms.common.train import run_local_training
from fedtune.models.hardware import Placement
from fedtune.training.batched import batchable, train_lora_clients
from fedtune.training.loop import StepHook

ADAPTER = "default"


class LoRAClient(ClientAlgorithm):
    """Trains the global LoRA adapter first-order and uploads it; a variant that only adds gradient terms to the
    local objective (FedProx) subclasses it and overrides `step_hooks`."""

    sync_replaces_state = True  # the sync payload is the whole global adapter

    def __init__(self) -> None:
        super().__init__()
        self.global_tensors: TensorDict | None = None

    def setup(self, model: nn.Module, payload: Payload, holding: Placement | None = None) -> nn.Module:
        m = payload.meta
        model = attach_lora(model, adapter=ADAPTER, rank=m["rank"], alpha=m["alpha"],
                            targets=m["target_modules"], dropout=m.get("dropout", 0.0))
        activate(model, ADAPTER)
        return model

    def sync(self, model: nn.Module, payload: Payload) -> None:
        if payload.tensors:
            set_lora_state(model, ADAPTER, payload.tensors)
            self.global_tensors = {k: v.clone() for k, v in payload.tensors.items()}

    def train(self, model: nn.Module, ctx: TrainContext, config: dict[str, Any]) -> ClientUpdate:
        if self.global_tensors is None:
            raise RuntimeError("train() before the first sync: the client has no global adapter")
        activate(model, ADAPTER)
        res, privacy = run_local_training(model, ctx, config, self.dp, self.step_hooks(config))
        update = get_lora_state(model, ADAPTER)
        set_lora_state(model, ADAPTER, self.global_tensors)  # leave the model at the global state
        return ClientUpdate(ctx.client_id, len(ctx.features), update, {"train_loss": res.loss, **privacy})

    def fork(self, model: nn.Module) -> nn.Module:
        return fork_model(model)  # own LoRA factors (at the global adapter), shared frozen base

    def train_many(self, model: nn.Module, ctxs: list[TrainContext], configs: list[dict[str, Any]]):
        """All of a round's clients in one batched loop (simulation), or None when they cannot share one
        (different schedules or batch sizes, DP): the caller then trains them one by one."""
        cfgs = batchable(configs, [len(c.features) for c in ctxs])
        if self.global_tensors is None or cfgs is None:
            return None
        activate(model, ADAPTER)
        results = train_lora_clients(lora_layers(model, ADAPTER), ADAPTER, model, [self.global_tensors] * len(ctxs),
                                     [c.features for c in ctxs], cfgs, pad_id=ctxs[0].pad_id,
                                     hooks=self.step_hooks(configs[0]))
        return [ClientUpdate(c.client_id, len(c.features), t, {"train_loss": r.loss})
                for c, (t, r) in zip(ctxs, results, strict=True)]

    def step_hooks(self, config: dict[str, Any]) -> tuple[StepHook, ...]:
        """Gradient terms of the local objective beyond the data loss (fedtune.training.loop.StepHook), from a round's
        train config; the same for every client of a round (a batched round uses the first client's). None here."""
        return ()

    def global_of(self) -> TensorDict | None:
        return self.global_tensors  # secure aggregation sums each client's change of A and B

    def export_factors(self, model: nn.Module):
        return adapter_factors(model, ADAPTER)
