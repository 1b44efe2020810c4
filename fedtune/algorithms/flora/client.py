"""FLoRA client: hold the cumulative merged ΔW, set W = W₀ + ΔW; train a fresh LoRA of its own rank."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from fedtune.algorithms.base import ClientAlgorithm, ClientUpdate, Payload, TensorDict, TrainContext
from fedtune.algorithms.fedavg.client import run_local_training
from fedtune.algorithms.flora.server import CUM, add_to_cumulative, cumulative_delta, round_key
from fedtune.algorithms.lora_common import (
    activate,
    attach_lora,
    fork_model,
    get_lora_state,
    init_lora_factors,
    lora_layers,
    set_lora_state,
    target_linears,
)
from fedtune.training.batched import batchable, train_lora_clients

log = logging.getLogger("fedtune")


def _check_factors(what: str, lin: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
    if not (a.dim() == b.dim() == 2 and a.shape[0] >= 1 and a.shape[1] == lin.in_features
            and tuple(b.shape) == (lin.out_features, a.shape[0]) and a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"flora sync: {what} has A {tuple(a.shape)}, B {tuple(b.shape)}; expected A R×{lin.in_features}"
                         f", B {lin.out_features}×R (float)")


def _check_payload(payload: Payload, linears: dict[str, nn.Linear], versions: list) -> None:
    """A sync payload from the coordinator: every stack / cumulative factor fits this model's modules (torch would
    broadcast a 1-row ΔW over the weight, or fail mid-merge)."""
    t = payload.tensors
    if payload.meta.get("cumulative"):
        known = {f"{CUM}{n}.{x}" for n in linears for x in "ABD"}
        if bad := sorted(k for k in t if k.startswith(CUM) and k not in known)[:1]:
            raise ValueError(f"flora sync: unexpected cumulative tensor {bad[0][:100]!r}")
        for n, lin in linears.items():
            if f"{CUM}{n}.D" in t and tuple(t[f"{CUM}{n}.D"].shape) != (lin.out_features, lin.in_features):
                raise ValueError(f"flora sync: {CUM}{n}.D has shape {tuple(t[f'{CUM}{n}.D'].shape)}")
            if f"{CUM}{n}.A" in t:
                _check_factors(f"{CUM}{n}", lin, t[f"{CUM}{n}.A"], t.get(f"{CUM}{n}.B", torch.empty(0)))
    for v in versions:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 99_999:
            raise ValueError(f"flora sync: merge version {str(v)[:20]!r} is not an integer in [0, 99999]")
        for n, lin in linears.items():
            _check_factors(f"round {v} {n}", lin, t[round_key(v, f"{n}.A")], t[round_key(v, f"{n}.B")])


class FLoRAClient(ClientAlgorithm):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.dropout = 0.0
        self.export_rank = 0
        self.base: TensorDict = {}  # W₀ of every target module, as set up
        self.cum: TensorDict = {}  # cumulative merged ΔW, same form and bits as the server's cum/
        self.export_info: dict[str, Any] | None = None

    def setup(self, model: nn.Module, payload: Payload) -> nn.Module:
        self.targets = list(payload.meta["target_modules"])
        self.dropout = float(payload.meta.get("dropout", 0.0))
        self.export_rank = int(payload.meta.get("export_rank", 0))
        r, alpha = int(payload.meta["rank"]), float(payload.meta["alpha"])
        model = attach_lora(model, adapter=f"r{r}", rank=r, alpha=alpha, targets=self.targets, dropout=self.dropout)
        for layer in lora_layers(model, f"r{r}").values():  # B = 0: the model equals the base
            layer.lora_B[f"r{r}"].weight.data.zero_()
        self.base = {n: lin.weight.detach().clone() for n, lin in target_linears(model, self.targets).items()}
        self.cum = {}
        return model

    @torch.no_grad()
    def sync(self, model: nn.Module, payload: Payload) -> None:
        """Take the server's cumulative ΔW, or add the missed rounds' stacks (d_out×R)(R×d_in) to ours in
        order; then W = W₀ + ΔW (float64 sum, rounded once), so every copy holds the same weights."""
        versions = payload.meta.get("merge_versions", [])
        if not payload.meta.get("cumulative") and not versions:
            return
        linears = target_linears(model, self.targets)
        _check_payload(payload, linears, versions)  # before any change: a refused payload leaves the model as it was
        if payload.meta.get("cumulative"):
            self.cum = {k: v.clone() for k, v in payload.tensors.items() if k.startswith(CUM)}
        for v in versions:
            for name in linears:
                add_to_cumulative(self.cum, name, payload.tensors[round_key(v, f"{name}.A")].clone(),
                                  payload.tensors[round_key(v, f"{name}.B")].clone())
        for name, lin in linears.items():
            got, w0 = cumulative_delta(self.cum, name), self.base[name]
            lin.weight.copy_(w0 if got is None else (w0.double() + got[0]).to(w0.dtype))

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

    def fork(self, model: nn.Module) -> nn.Module:
        return fork_model(model)  # own LoRA adapters (every rank's, B = 0), shared W = W₀ + ΔW

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

    @torch.no_grad()
    def export_factors(self, model: nn.Module):
        """The cumulative ΔW per module through its SVD ΔW = U S Vᵀ: A = √S Vᵀ, B = U √S (scale 1), at rank
        k = min(R, d_in, d_out) (exact), or at most `export_rank` (relative Frobenius error reported)."""
        out, err2, norm2 = {}, 0.0, 0.0
        for name in target_linears(model, self.targets):
            got = cumulative_delta(self.cum, name)
            if got is None:
                return None
            delta, k = got
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            if self.export_rank:
                k = min(k, self.export_rank)
            err2 += float((s[k:] ** 2).sum())
            norm2 += float((s ** 2).sum())
            root = s[:k].sqrt()
            out[name] = ((root[:, None] * vh[:k]).float(), (u[:, :k] * root).float())
        ranks = sorted({a.shape[0] for a, _ in out.values()})
        rel = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
        self.export_info = {"rank": ranks[-1], "ranks": ranks, "export_rank": self.export_rank or None,
                            "relative_error": rel}
        if self.export_rank:
            log.info("flora export: ΔW truncated to rank ≤ %d, relative error ‖ΔW − ΔW_k‖_F/‖ΔW‖_F = %.3g",
                     self.export_rank, rel)
        return out
