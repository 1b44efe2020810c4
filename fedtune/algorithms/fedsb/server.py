"""Fed-SB server: computes the shared A, B once, averages R (see package docstring)."""

from __future__ import annotations

import logging
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
    payload_nbytes,
    weighted_mean,
)
from fedtune.algorithms.common.lora import target_linears
from fedtune.algorithms.fedsb.client import FedSBClient
from fedtune.algorithms.fedsb.config import FedSBConfig
from fedtune.algorithms.fedsb.init import full_weight_grads, random_factors, svd_factors
from fedtune.algorithms.fedsb.shared import R_KEY, modules_of

log = logging.getLogger(__name__)


class FedSB(FedAlgorithm):
    name = "fedsb"
    config_class = FedSBConfig
    state_format = 2  # 2: all R in one packed [n_modules, r, r] tensor "R" (1: one "<module>.R" each)
    CAPABILITIES = Capabilities(tensor_average=True, exact=True, update_norm="delta", data_init=True, secure_sum=True)
    config: FedSBConfig

    def __init__(self, config: FedSBConfig) -> None:
        super().__init__(config)
        self._init_data: tuple[list[dict], int] | None = None

    def set_init_data(self, features: Sequence[dict[str, list[int]]], pad_id: int) -> None:
        """Tokenized examples for the data-driven init; call before `initialize`. Under DP these must be
        public/proxy data (the init is not privatised) or their use must be counted in the budget."""
        if not features:
            raise ValueError("fedsb set_init_data got no examples; pass a few tokenized (public) examples")
        self._init_data = (list(features), int(pad_id))

    def initialize(self, model: nn.Module, *, seed: int) -> GlobalState:
        """State: "<m>.A" (r×d_in), "<m>.B" (d_out×r) frozen and never aggregated; "R" [n_modules, r, r] = 0, the
        R of module i of modules_of(state.tensors) at R[i]."""
        c = self.config
        linears = target_linears(model, c.target_modules)
        found = {n.rsplit(".", 1)[-1] for n in linears}
        if missing := [t for t in c.target_modules if t not in found]:
            raise ValueError(f"fedsb target_modules {missing} match no nn.Linear in the model "
                             f"(found: {sorted(found)}); check [fedsb] target_modules")
        shapes = {n: (lin.out_features, lin.in_features) for n, lin in linears.items()}
        if too_small := {n: s for n, s in shapes.items() if min(s) < c.rank}:
            n, s = next(iter(sorted(too_small.items())))
            raise ValueError(f"fedsb rank {c.rank} exceeds min(d_out, d_in) = {min(s)} of {n} {s}; lower [fedsb] rank")
        init_seed = seed if c.init_seed is None else c.init_seed
        if self._init_data is None:
            log.warning("fedsb: no init data (FedSB.set_init_data was not called); using seeded random "
                        "orthonormal A, B instead of the LoRA-SB gradient init")
            factors, how = random_factors(shapes, c.rank, init_seed), "random"
        else:
            feats, pad_id = self._init_data
            grads = full_weight_grads(model, linears, feats, pad_id, n_batches=c.init_batches,
                                      batch_size=c.init_batch_size, seed=init_seed)
            factors = svd_factors(grads, c.rank, mode=c.init_mode, seed=init_seed, niter=c.svd_niter)
            how = f"data-{c.init_mode}"
        tensors = {}  # float32 on the CPU whatever the base holds (bfloat16, nf4, ...): the adapter's master weights
        for name, (a, b) in sorted(factors.items()):
            tensors[f"{name}.A"], tensors[f"{name}.B"] = a.to("cpu", torch.float32), b.to("cpu", torch.float32)
        tensors[R_KEY] = torch.zeros(len(factors), c.rank, c.rank, dtype=torch.float32)
        return GlobalState(version=0, tensors=tensors, meta={"init": how, "init_seed": init_seed})

    def setup_payload(self, state: GlobalState) -> Payload:
        """A and B of every module: sent once per client."""
        ab = {k: v for k, v in state.tensors.items() if k.endswith((".A", ".B"))}
        return Payload(tensors=ab, meta={"algorithm": self.name, "rank": self.config.rank,
                                         "target_modules": list(self.config.target_modules)})

    def sync_payload(self, state: GlobalState, from_version: int) -> Payload:
        """The packed global R (it replaces the local one, so one step catches up from any version)."""
        if from_version == state.version:
            return Payload(meta={"version": state.version})
        return Payload(tensors={R_KEY: state.tensors[R_KEY]}, meta={"version": state.version})

    def expected_update(self, state: GlobalState, train: dict) -> UpdateSpec:
        """One tensor "R" [n_modules, r, r] (module order: modules_of) in the global R's dtype; A and B are never
        uploaded."""
        r = state.tensors[R_KEY]
        radius = adam_radius(train, float(r.abs().max()) if r.numel() else 0.0)  # what `steps` AdamW steps can move R
        return UpdateSpec({R_KEY: TensorSpec(tuple(r.shape), r.dtype, near=r, radius=radius)})

    def aggregate(self, rnd: int, state: GlobalState, updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict]:
        """R_g = Σ p_k R_k (exact: B R_g A = Σ p_k B R_k A). A, B carried over unchanged."""
        p = example_weights(updates, uniform=self.config.uniform)
        mods, want = modules_of(state.tensors), tuple(state.tensors[R_KEY].shape)
        for u in updates:
            if set(u.tensors) != {R_KEY}:
                raise ValueError(f"update from {u.client_id} must hold exactly one tensor {R_KEY!r} (the packed R), "
                                 f"got {sorted(u.tensors)[:3]}")
            if tuple(u.tensors[R_KEY].shape) != want:
                raise ValueError(f"update from {u.client_id}: {R_KEY} has shape {tuple(u.tensors[R_KEY].shape)}, "
                                 f"expected {want} ([n_modules, r, r])")
        tensors = dict(state.tensors)
        tensors[R_KEY] = weighted_mean([u.tensors[R_KEY] for u in updates], p)  # element-wise: each R_m exactly
        sb = lora = 0
        for m in mods:
            r, d_in = state.tensors[f"{m}.A"].shape
            d_out = state.tensors[f"{m}.B"].shape[0]
            sb, lora = sb + r * r, lora + r * (d_in + d_out)
        up = [payload_nbytes(u.tensors) for u in updates]
        metrics = {"fedsb_upload_bytes": float(sum(up) / len(up)), "fedsb_vs_lora_upload_ratio": sb / lora}
        return GlobalState(version=state.version + 1, tensors=tensors, meta=dict(state.meta)), metrics

    def make_client(self) -> FedSBClient:
        return FedSBClient()
