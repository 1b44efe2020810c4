"""FLoRA server side: stack p_k-weighted client factors (see package docstring).

State (the update rule it shares with the clients is in shared.py), bounded in the number of rounds:
  cum/<module>.{A,B}   the cumulative merged ΔW = Σ_rounds B_stack·A_stack as stacked factors, while its rank
                       R = Σ r stays below min(d_in, d_out) ...
  cum/<module>.D       ... then as a dense float64 matrix (d_out × d_in)
  v<NNNNN>/<module>.{A,B}   the stacks of the last `keep_rounds` rounds only, and only as many as together
                       are no more bytes than cum/ (older ones would never be sent)
A client at most keep_rounds behind gets the stacks it missed, any other client the cumulative ΔW
(whichever is fewer bytes); both are exact. `add_to_cumulative` is the one update rule, used by the server
and by every client, so all of them hold the same ΔW bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from fedtune.algorithms.api import (
    SETUP_FIELDS,
    Bound,
    Capabilities,
    ClientUpdate,
    FedAlgorithm,
    GlobalState,
    Payload,
    UpdateSpec,
    example_weights,
    payload_nbytes,
)
from fedtune.algorithms.common.lora import lora_shapes, lora_update_spec
from fedtune.algorithms.flora.client import FLoRAClient
from fedtune.algorithms.flora.config import FLoRAConfig
from fedtune.algorithms.flora.shared import CUM, add_to_cumulative, round_key, version_of


class FLoRA(FedAlgorithm):
    name = "flora"
    config_class = FLoRAConfig
    CAPABILITIES = Capabilities(
        update_norm="lora_product", exact=True, batched=True,
        no_tensor_average="FLoRA stacks the clients' LoRA factors, so the global rank grows with every client and "
                          "updates are concatenated; there is no fixed-shape sum to clip and noise, and no "
                          "coordinate-wise mean to trim",
        no_secure_sum="its aggregate stacks each client's LoRA factors side by side, so every block of the "
                      "global adapter is one client's update: there is no sum to hide them in. Use fedavg or fedsb "
                      "(Fed-SB's R average is exact, as FLoRA's stacking is)")
    train_fields: ClassVar[Mapping[str, Bound]] = {k: SETUP_FIELDS[k] for k in ("rank", "alpha")}
    resumable = ("keep_rounds", "export_rank")  # what is kept and how it is exported; not what was computed
    config: FLoRAConfig

    def initialize(self, model: nn.Module, *, seed: int) -> GlobalState:
        shapes = lora_shapes(model, self.config.target_modules)  # fails early on bad targets
        # module shapes {m: [d_out, d_in]}: what every client's update is checked against
        return GlobalState(version=0, tensors={}, meta={"stacked_rank": {}, "total_rank": 0,
                                                        "modules": {m: list(s) for m, s in sorted(shapes.items())}})

    def setup_payload(self, state: GlobalState) -> Payload:
        c = self.config
        return Payload(meta={"algorithm": self.name, "target_modules": list(c.target_modules),
                             "dropout": c.dropout, "rank": c.rank, "alpha": c.alpha, "export_rank": c.export_rank})

    def sync_payload(self, state: GlobalState, from_version: int) -> Payload:
        """The stacks of rounds from_version+1 … state.version to merge in order when all are kept and they
        are fewer bytes than the cumulative ΔW; else the cumulative ΔW (the client resets to base + ΔW)."""
        versions = list(range(max(from_version, 0) + 1, state.version + 1))
        if not versions:
            return Payload(meta={"merge_versions": [], "version": state.version})
        prefixes = tuple(round_key(v, "") for v in versions)
        stacks = {k: v for k, v in state.tensors.items() if k.startswith(prefixes)}
        cum = {k: v for k, v in state.tensors.items() if k.startswith(CUM)}
        kept = {version_of(k) for k in stacks}
        if kept == set(versions) and payload_nbytes(stacks) <= payload_nbytes(cum):
            return Payload(tensors=stacks, meta={"merge_versions": versions, "version": state.version})
        return Payload(tensors=cum, meta={"cumulative": True, "merge_versions": [], "version": state.version})

    def configure_round(self, rnd, state, client_ids, base_train, roster) -> dict[str, dict[str, Any]]:
        out = {}
        for cid in client_ids:
            r = self.config.rank_for(list(roster).index(cid))
            out[cid] = dict(base_train, rank=r, alpha=self.config.alpha_for(r))
        return out

    def expected_update(self, state: GlobalState, train: dict) -> UpdateSpec:
        """A fresh LoRA of the rank assigned to this client: A (r×d_in), B (d_out×r, scale folded in), each value within
        what its local training can reach from peft's init (lora_update_spec)."""
        if "modules" not in state.meta:
            raise ValueError("flora state has no module shapes (checkpoint from an older fedtune); start a new run")
        rank = int(train["rank"])
        return lora_update_spec(state.meta["modules"], rank, train=train, scale=float(train["alpha"]) / rank)

    def aggregate(self, rnd: int, state: GlobalState, updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict]:
        p = example_weights(updates, uniform=self.config.uniform)
        modules = sorted({k[:-2] for k in updates[0].tensors})
        v = state.version + 1
        oldest = v - self.config.keep_rounds + 1  # stacks of older rounds live on in cum/ only
        tensors = dict(state.tensors)
        for mod in modules:
            # clients send s_k·B_k (scale folded in), so B_stack needs no further scaling
            a = torch.cat([pk * u.tensors[f"{mod}.A"] for pk, u in zip(p, updates)], 0)
            b = torch.cat([u.tensors[f"{mod}.B"] for u in updates], 1)
            if self.config.keep_rounds > 0:
                tensors[round_key(v, f"{mod}.A")], tensors[round_key(v, f"{mod}.B")] = a, b
            add_to_cumulative(tensors, mod, a, b)
        # a client k rounds behind gets the last k stacks only if they are fewer bytes than cum/: keep no more
        cum_bytes = payload_nbytes({k: t for k, t in tensors.items() if k.startswith(CUM)})
        total, kept = 0, set()
        for w in range(v, oldest - 1, -1):
            total += payload_nbytes({k: t for k, t in tensors.items() if version_of(k) == w})
            if total > cum_bytes:
                break
            kept.add(w)
        tensors = {k: t for k, t in tensors.items() if version_of(k) in kept or k.startswith(CUM)}
        stacked = sum(u.tensors[f"{modules[0]}.A"].shape[0] for u in updates)
        ranks = {k: r for k, r in state.meta.get("stacked_rank", {}).items() if int(k) in kept}
        meta = dict(state.meta, stacked_rank=dict(ranks, **({str(v): stacked} if v in kept else {})),
                    total_rank=int(state.meta.get("total_rank", 0)) + stacked)
        return GlobalState(version=v, tensors=tensors, meta=meta), {"flora_stacked_rank": float(stacked)}

    def make_client(self) -> FLoRAClient:
        return FLoRAClient()
