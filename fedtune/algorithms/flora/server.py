"""FLoRA server side: stack p_k-weighted client factors (see package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedtune.algorithms.base import (
    ClientUpdate,
    FedAlgorithm,
    GlobalState,
    Payload,
    UpdateSpec,
    example_weights,
    lora_update_spec,
)
from fedtune.algorithms.flora.config import FLoRAConfig
from fedtune.algorithms.lora_common import lora_shapes


def round_key(version: int, name: str) -> str:
    return f"v{version:05d}/{name}"


class FLoRA(FedAlgorithm):
    name = "flora"
    config: FLoRAConfig

    def initialize(self, model: nn.Module, *, seed: int) -> GlobalState:
        shapes = lora_shapes(model, self.config.target_modules)  # fails early on bad targets
        # module shapes {m: [d_out, d_in]}: what every client's update is checked against
        return GlobalState(version=0, tensors={}, meta={"stacked_rank": {}, "modules": {m: list(s) for m, s in
                                                                                       sorted(shapes.items())}})

    def setup_payload(self, state: GlobalState) -> Payload:
        c = self.config
        return Payload(meta={"algorithm": self.name, "target_modules": list(c.target_modules),
                             "dropout": c.dropout, "rank": c.rank, "alpha": c.alpha})

    def sync_payload(self, state: GlobalState, from_version: int) -> Payload:
        """The stacked factors of rounds from_version+1 … state.version, to merge in order."""
        versions = list(range(max(from_version, 0) + 1, state.version + 1))
        prefixes = tuple(round_key(v, "") for v in versions)
        tensors = {k: v for k, v in state.tensors.items() if k.startswith(prefixes)}
        return Payload(tensors=tensors, meta={"merge_versions": versions, "version": state.version})

    def configure_round(self, rnd, state, client_ids, base_train, roster) -> dict[str, dict[str, Any]]:
        out = {}
        for cid in client_ids:
            r = self.config.rank_for(list(roster).index(cid))
            out[cid] = dict(base_train, rank=r, alpha=self.config.alpha_for(r))
        return out

    def expected_update(self, state: GlobalState, train: dict) -> UpdateSpec:
        """A fresh LoRA of the rank assigned to this client: A (r×d_in), B (d_out×r, scale folded in)."""
        if "modules" not in state.meta:
            raise ValueError("flora state has no module shapes (checkpoint from an older fedtune); start a new run")
        return lora_update_spec(state.meta["modules"], int(train["rank"]))

    def aggregate(self, rnd: int, state: GlobalState, updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict]:
        p = example_weights(updates, uniform=self.config.uniform)
        modules = sorted({k[:-2] for k in updates[0].tensors})
        v = state.version + 1
        tensors = dict(state.tensors)
        for mod in modules:
            # clients send s_k·B_k (scale folded in), so B_stack needs no further scaling
            tensors[round_key(v, f"{mod}.A")] = torch.cat([pk * u.tensors[f"{mod}.A"] for pk, u in zip(p, updates)], 0)
            tensors[round_key(v, f"{mod}.B")] = torch.cat([u.tensors[f"{mod}.B"] for u in updates], 1)
        stacked = sum(u.tensors[f"{modules[0]}.A"].shape[0] for u in updates)
        meta = dict(state.meta, stacked_rank=dict(state.meta.get("stacked_rank", {}), **{str(v): stacked}))
        return GlobalState(version=v, tensors=tensors, meta=meta), {"flora_stacked_rank": float(stacked)}

    def make_client(self):
        from fedtune.algorithms.flora.client import FLoRAClient

        return FLoRAClient()
