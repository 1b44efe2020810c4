"""FLoRA client: merge the stacked global factors into the base; train a fresh LoRA of its own rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedtune.algorithms.base import ClientAlgorithm, ClientUpdate, Payload, TrainContext
from fedtune.algorithms.fedavg.client import run_local_training
from fedtune.algorithms.flora.server import round_key
from fedtune.algorithms.lora_common import (
    activate,
    attach_lora,
    get_lora_state,
    init_lora_factors,
    lora_layers,
    set_lora_state,
    target_linears,
)
from fedtune.training.batched import batchable, train_lora_clients


class FLoRAClient(ClientAlgorithm):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.dropout = 0.0
        self.merged: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # for export: (version, A_stack, B_stack)
        self.history: dict[int, dict[str, torch.Tensor]] = {}

    def setup(self, model: nn.Module, payload: Payload) -> nn.Module:
        self.targets = list(payload.meta["target_modules"])
        self.dropout = float(payload.meta.get("dropout", 0.0))
        r, alpha = int(payload.meta["rank"]), float(payload.meta["alpha"])
        model = attach_lora(model, adapter=f"r{r}", rank=r, alpha=alpha, targets=self.targets, dropout=self.dropout)
        for layer in lora_layers(model, f"r{r}").values():  # B = 0: the model equals the base
            layer.lora_B[f"r{r}"].weight.data.zero_()
        return model

    @torch.no_grad()
    def sync(self, model: nn.Module, payload: Payload) -> None:
        """W ← W + B_stack·A_stack for every missed round, in order. Shapes: (d_out×R)(R×d_in)."""
        linears = target_linears(model, self.targets)
        for v in payload.meta.get("merge_versions", []):
            for name, lin in linears.items():
                a = payload.tensors[round_key(v, f"{name}.A")]
                b = payload.tensors[round_key(v, f"{name}.B")]
                lin.weight.add_((b.double() @ a.double()).to(lin.weight.dtype))
                self.history.setdefault(v, {})[name + ".A"] = a.clone()
                self.history[v][name + ".B"] = b.clone()

    def train(self, model: nn.Module, ctx: TrainContext, config: dict[str, Any]) -> ClientUpdate:
        rank, alpha = int(config["rank"]), float(config["alpha"])
        adapter = f"r{rank}"
        model = attach_lora(model, adapter=adapter, rank=rank, alpha=alpha, targets=self.targets, dropout=self.dropout)
        activate(model, adapter)
        shapes = {n: (lin.out_features, lin.in_features) for n, lin in target_linears(model, self.targets).items()}
        set_lora_state(model, adapter, init_lora_factors(shapes, rank, seed=int(config["seed"])))  # fresh LoRA
        res, privacy = run_local_training(model, ctx, config, self.dp)
        update = get_lora_state(model, adapter, fold_scale=True)  # B carries s_k
        for layer in lora_layers(model, adapter).values():  # B = 0: the adapter adds nothing until next round
            layer.lora_B[adapter].weight.data.zero_()
        return ClientUpdate(ctx.client_id, len(ctx.features), update, {"train_loss": res.loss, **privacy})

    def train_many(self, model: nn.Module, ctxs: list[TrainContext], configs: list[dict[str, Any]]):
        """A round's clients in one batched loop (simulation). Heterogeneous ranks share the largest rank R:
        client k's factors are zero-padded to R (A rows, B columns); padded entries get exactly zero gradient
        (∂L/∂A_pad = B_padᵀ(…) = 0 and ∂L/∂B_pad = (…)(A_pad x)ᵀ = 0), so they stay 0 and slicing them off
        gives the rank-r_k result. Needs one scale s = α_k/r_k for all (FLoRAConfig keeps it). None: fall back."""
        cfgs = batchable(configs, [len(c.features) for c in ctxs])
        scales = {float(c["alpha"]) / int(c["rank"]) for c in configs}
        if cfgs is None or len(scales) != 1:
            return None
        ranks = [int(c["rank"]) for c in configs]
        big = max(ranks)
        adapter = f"r{big}"
        model = attach_lora(model, adapter=adapter, rank=big, alpha=big * scales.pop(), targets=self.targets,
                            dropout=self.dropout)
        activate(model, adapter)
        shapes = {n: (lin.out_features, lin.in_features) for n, lin in target_linears(model, self.targets).items()}
        starts = []
        for r, c in zip(ranks, configs, strict=True):
            init = init_lora_factors(shapes, r, seed=int(c["seed"]))  # the same fresh LoRA as train() draws
            starts.append({k: (nn.functional.pad(v, (0, 0, 0, big - r)) if k.endswith(".A")
                               else nn.functional.pad(v, (0, big - r))) for k, v in init.items()})
        layers = lora_layers(model, adapter)
        results = train_lora_clients(layers, adapter, model, starts, [c.features for c in ctxs], cfgs,
                                     pad_id=ctxs[0].pad_id)
        s = next(iter(layers.values())).scaling[adapter]
        out = []
        for ctx, r, (t, res) in zip(ctxs, ranks, results, strict=True):
            update = {k: (v[:r].clone() if k.endswith(".A") else v[:, :r] * s) for k, v in t.items()}
            out.append(ClientUpdate(ctx.client_id, len(ctx.features), update, {"train_loss": res.loss}))
        return out

    def export_factors(self, model: nn.Module):
        """All merged rounds stacked: exact ΔW_total = Σ_v B_v A_v, scale 1."""
        if not self.history:
            return None
        out = {}
        for name in target_linears(model, self.targets):
            a = torch.cat([self.history[v][name + ".A"] for v in sorted(self.history)], 0)
            b = torch.cat([self.history[v][name + ".B"] for v in sorted(self.history)], 1)
            out[name] = (a, b)
        return out
