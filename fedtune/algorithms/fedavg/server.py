"""FedAvg server side: weighted mean of A and B (see package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedtune.algorithms.api import (
    Capabilities,
    ClientUpdate,
    FedAlgorithm,
    GlobalState,
    Payload,
    TensorSpec,
    UpdateSpec,
    adam_radius,
    example_weights,
    weighted_mean,
)
from fedtune.algorithms.common.lora import init_lora_factors, lora_shapes
from fedtune.algorithms.fedavg.client import LoRAClient
from fedtune.algorithms.fedavg.config import FedAvgConfig


class FedAvg(FedAlgorithm):
    name = "fedavg"
    config_class = FedAvgConfig
    CAPABILITIES = Capabilities(tensor_average=True, update_norm="delta", batched=True, baseline=True, secure_sum=True)
    config: FedAvgConfig

    def initialize(self, model: nn.Module, *, seed: int) -> GlobalState:
        shapes = lora_shapes(model, self.config.target_modules)
        return GlobalState(version=0, tensors=init_lora_factors(shapes, self.config.rank, seed))

    def setup_payload(self, state: GlobalState) -> Payload:
        c = self.config
        return Payload(meta={"algorithm": self.name, "rank": c.rank, "alpha": c.alpha,
                             "target_modules": list(c.target_modules), "dropout": c.dropout})

    def sync_payload(self, state: GlobalState, from_version: int) -> Payload:
        # The global adapter replaces the local one whole, so any version catches up in one step.
        if from_version == state.version:
            return Payload(meta={"version": state.version})
        return Payload(tensors=dict(state.tensors), meta={"version": state.version})

    def expected_update(self, state: GlobalState, train: dict) -> UpdateSpec:
        """The client's whole trained adapter: every global A and B, same shapes and dtypes, each value within what
        `steps` AdamW steps can move it from the global one (adam_radius)."""
        return UpdateSpec({k: TensorSpec(tuple(v.shape), v.dtype, near=v,
                                         radius=adam_radius(train, float(v.abs().max()) if v.numel() else 0.0))
                           for k, v in state.tensors.items()})

    def aggregate(self, rnd: int, state: GlobalState, updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict]:
        p = example_weights(updates, uniform=self.config.uniform)
        keys = sorted(state.tensors)
        for u in updates:
            if sorted(u.tensors) != keys:
                raise ValueError(f"update from {u.client_id} has keys that differ from the global adapter")
        new = {k: weighted_mean([u.tensors[k] for u in updates], p) for k in keys}
        gap2 = exact2 = 0.0
        for mod in sorted({k[:-2] for k in keys}):
            exact = sum(pk * (u.tensors[f"{mod}.B"].double() @ u.tensors[f"{mod}.A"].double()) for pk, u in zip(p, updates))
            approx = new[f"{mod}.B"].double() @ new[f"{mod}.A"].double()
            gap2 += float(torch.linalg.matrix_norm(exact - approx) ** 2)
            exact2 += float(torch.linalg.matrix_norm(exact) ** 2)
        metrics = {"fedavg_gap": gap2**0.5, "fedavg_gap_rel": (gap2 / exact2) ** 0.5 if exact2 > 0 else 0.0}
        return GlobalState(version=state.version + 1, tensors=new, meta=dict(state.meta)), metrics

    def make_client(self) -> LoRAClient:
        return LoRAClient()
