"""FLoRA client: hold the cumulative merged ΔW, set W = W₀ + ΔW; train a fresh LoRA of its own rank.

On an exact base (float32, not quantized: `Placement.exact`) ΔW is merged into the weights (float64 sum,
rounded once). On any other base (bfloat16/float16 weights, nf4/int8 bitsandbytes layers) merging would
round — requantize, for 4/8-bit — the base every round and lose most of a small ΔW, so W₀ stays untouched
and a `CumulativeDelta` forward hook on each target base linear adds x·ΔWᵀ beside it in float32: factored,
(x·Aᵀ)·Bᵀ, while the server's cumulative ΔW is factored, else dense x·Dᵀ. The hook holds no parameters
(opacus and the optimiser never see it), runs again under gradient checkpointing's recompute, and sits under
peft's LoRA layer (peft calls base_layer(x)), so the fresh LoRA trains on W₀ + ΔW either way.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedtune.algorithms.api import ClientAlgorithm, ClientUpdate, Payload, TensorDict, TrainContext
from fedtune.algorithms.common.lora import (
    activate,
    attach_lora,
    fork_model,
    get_lora_state,
    init_lora_factors,
    lora_layers,
    set_lora_state,
    target_linears,
)
from fedtune.algorithms.common.train import run_local_training
from fedtune.algorithms.flora.shared import CUM, add_to_cumulative, cumulative_delta, round_key
from fedtune.models.hardware import Placement, placement
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


class CumulativeDelta:
    """Forward hook of one target base linear: output + x·ΔWᵀ, ΔW in float32 on the layer's device (factors
    A R×d_in, B d_out×R, or dense D d_out×d_in); adds nothing before the first merge. Forks of the model
    (`fork_model` deep-copies the module tree, hooks included) share this object: the synced ΔW is global."""

    def __init__(self) -> None:
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.d: torch.Tensor | None = None

    def __deepcopy__(self, memo) -> CumulativeDelta:
        return self

    def load(self, cum: TensorDict, module: str, device: torch.device) -> None:
        """Take module's ΔW from a cum/ dict (the client's copy of the server's cumulative)."""
        d, a, b = (cum.get(f"{CUM}{module}.{x}") for x in "DAB")
        f32 = {"device": device, "dtype": torch.float32}
        self.d = None if d is None else d.to(**f32)
        self.a, self.b = (None, None) if d is not None or a is None else (a.to(**f32), b.to(**f32))

    def weight(self) -> torch.Tensor | None:
        """ΔW (d_out×d_in, float32) exactly as the hook applies it (B·A in float32 when factored)."""
        return self.d if self.d is not None else None if self.a is None else self.b @ self.a

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.d is None and self.a is None:
            return output
        x = args[0].to(torch.float32)
        delta = F.linear(x, self.d) if self.d is not None else F.linear(F.linear(x, self.a), self.b)
        return output + delta.to(output.dtype)


def delta_hooks(linears: dict[str, nn.Module]) -> dict[str, CumulativeDelta]:
    """{module: its CumulativeDelta hook} of the target linears that carry one."""
    return {n: h for n, lin in linears.items() for h in lin._forward_hooks.values() if isinstance(h, CumulativeDelta)}


class FLoRAClient(ClientAlgorithm):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.dropout = 0.0
        self.export_rank = 0
        self.base: TensorDict = {}  # W₀ of every target module, as set up
        self.cum: TensorDict = {}  # cumulative merged ΔW, same form and bits as the server's cum/
        self.exact = True  # float32 unquantized base: ΔW merged into W; else kept beside it (CumulativeDelta)
        self.deltas: dict[str, CumulativeDelta] = {}

    def setup(self, model: nn.Module, payload: Payload, holding: Placement | None = None) -> nn.Module:
        self.targets = list(payload.meta["target_modules"])
        self.dropout = float(payload.meta.get("dropout", 0.0))
        self.export_rank = int(payload.meta.get("export_rank", 0))
        r, alpha = int(payload.meta["rank"]), float(payload.meta["alpha"])
        model = attach_lora(model, adapter=f"r{r}", rank=r, alpha=alpha, targets=self.targets, dropout=self.dropout)
        for layer in lora_layers(model, f"r{r}").values():  # B = 0: the model equals the base
            layer.lora_B[f"r{r}"].weight.data.zero_()
        linears = target_linears(model, self.targets)
        self.exact = (holding or placement(model)).exact
        self.cum = {}
        for lin in linears.values():  # idempotent: a second setup drops the first one's hooks
            for key in [k for k, h in lin._forward_hooks.items() if isinstance(h, CumulativeDelta)]:
                del lin._forward_hooks[key]
        if self.exact:
            self.base = {n: lin.weight.detach().clone() for n, lin in linears.items()}
            self.deltas = {}
        else:  # W₀ (rounded / quantized) is never written: ΔW is applied beside it in float32
            self.base = {}
            self.deltas = {n: CumulativeDelta() for n in linears}
            for n, lin in linears.items():
                lin.register_forward_hook(self.deltas[n])
        return model

    @torch.no_grad()
    def sync(self, model: nn.Module, payload: Payload) -> None:
        """Take the server's cumulative ΔW, or add the missed rounds' stacks (d_out×R)(R×d_in) to ours in
        order; then W = W₀ + ΔW (float64 sum, rounded once), so every copy holds the same weights — or, on a
        base that is not exact, hand ΔW to each module's CumulativeDelta hook (W₀ untouched)."""
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
        if not self.exact:
            for name, lin in linears.items():
                self.deltas[name].load(self.cum, name, lin.weight.device)
            return
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
        return fork_model(model)  # own LoRA adapters (every rank's, B = 0), shared W = W₀ + ΔW (or W₀ and hooks)

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
