"""Fed-SB client: wrap the targets with the shared A, B once; load the global R; train R only."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedtune.algorithms.api import MAX_RANK, ClientAlgorithm, ClientUpdate, Payload, TrainContext
from fedtune.algorithms.common.lora import fork_model
from fedtune.algorithms.common.train import run_local_training
from fedtune.algorithms.fedsb.layer import attach_sb, freeze_all_but_r, get_R, sb_layers, set_R
from fedtune.algorithms.fedsb.shared import R_KEY, modules_of
from fedtune.models.hardware import Placement


class FedSBClient(ClientAlgorithm):
    sync_replaces_state = True  # the sync payload is the whole global adapter

    def __init__(self) -> None:
        super().__init__()
        self.global_R: torch.Tensor | None = None  # packed [n_modules, r, r]

    def setup(self, model: nn.Module, payload: Payload, holding: Placement | None = None) -> nn.Module:
        t = payload.tensors
        mods = modules_of(t)
        if not mods:
            raise ValueError("fedsb setup payload carries no A/B factors")
        ranks = {t[f"{m}.A"].shape[0] if t[f"{m}.A"].dim() == 2 else -1 for m in mods}
        if len(ranks) != 1 or not 1 <= min(ranks) <= MAX_RANK:  # R is r×r per module: r = 50,000 would be 10 GB
            raise ValueError(f"fedsb setup payload: A factors of ranks {sorted(ranks)[:4]}; expected one rank in "
                             f"[1, {MAX_RANK}]")
        return attach_sb(model, {m: (t[f"{m}.A"], t[f"{m}.B"]) for m in mods})

    def sync(self, model: nn.Module, payload: Payload) -> None:
        if payload.tensors:
            if set(payload.tensors) != {R_KEY}:
                raise ValueError(f"fedsb sync payload must hold exactly the packed {R_KEY!r}, got {sorted(payload.tensors)[:3]}")
            set_R(model, payload.tensors[R_KEY])
            self.global_R = payload.tensors[R_KEY].detach().to("cpu", copy=True)

    def train(self, model: nn.Module, ctx: TrainContext, config: dict[str, Any]) -> ClientUpdate:
        if self.global_R is None:
            raise RuntimeError("train() before the first sync: the client has no global R")
        freeze_all_but_r(model)
        res, privacy = run_local_training(model, ctx, config, self.dp)
        update = {R_KEY: get_R(model)}  # [n_modules, r, r]: the whole upload
        set_R(model, self.global_R)  # leave the model at the global state
        return ClientUpdate(ctx.client_id, len(ctx.features), update, {"train_loss": res.loss, **privacy})

    def global_of(self) -> dict[str, torch.Tensor] | None:
        return None if self.global_R is None else {R_KEY: self.global_R}  # secure aggregation sums R − R_g

    def fork(self, model: nn.Module) -> nn.Module:
        return fork_model(model, lambda name: ".sb_R." in name)  # own R (at the global R); A, B, base shared

    @torch.no_grad()
    def export_factors(self, model: nn.Module):
        """{module: (A r×d_in, B·R d_out×r)}: a standard LoRA adapter with scale 1 (lora_alpha = r)."""
        return {n: (m.sb_A.weight.detach().to("cpu", copy=True), (m.sb_B.weight @ m.sb_R.weight).to("cpu"))
                for n, m in sb_layers(model).items()}
