"""Robust aggregation ([robust], off by default): bound each client's influence, then aggregate.

Per client k, the size of its update, as the method declares it (Capabilities.update_norm):
    "delta" (FedAvg's A and B, Fed-SB's R):          ‖Δ_k‖₂,  Δ_k = θ_k − θ_g over all its tensors
    "lora_product" (FLoRA: the whole weight change):  (Σ_m ‖s_k B_k,m A_k,m‖_F²)^½
The bound b = norm_bound, or b = norm_bound_median_mult · median_k ‖Δ_k‖ (this round's median).
    clip:   Δ_k ← Δ_k · min(1, b / ‖Δ_k‖)   ("lora_product": B_k ← B_k · min(1, b / ‖Δ_k‖), so s·B·A scales)
    reject: client k is left out of this round when ‖Δ_k‖ > b
Then, for methods whose aggregate is a tensor average (Capabilities.tensor_average), per coordinate over the K
kept clients, unweighted (a client's claimed num_examples gives it no extra say):
    mean:          the method's own (example-weighted) aggregate
    trimmed_mean:  drop the ⌊β·K⌋ largest and ⌊β·K⌋ smallest values, average the rest (β = trim_fraction)
    median:        the middle value (mean of the two middle values when K is even)
A wrapper around `aggregate` like ClientLevelDP: pure and deterministic; everything else is delegated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fedtune.algorithms.api import ClientUpdate, FedAlgorithm, GlobalState, TensorDict, update_norm
from fedtune.algorithms.wrappers.base import Wrapper
from fedtune.configbase import dataclass_from_dict, option

ACTIONS = ("clip", "reject")
AGGREGATORS = ("mean", "trimmed_mean", "median")


@dataclass
class RobustConfig:
    """[robust] section. Nothing set = off."""

    norm_bound: float = option(0.0, "absolute bound on each client's update norm; 0: none")
    norm_bound_median_mult: float = option(0.0, "bound = this × the round's median update norm; 0: none")
    norm_action: str = option("clip", '"clip" or "reject" the updates above the bound')
    aggregator: str = option("mean", '"mean" (the method\'s own), "trimmed_mean" or "median" (coordinate-wise; '
                                     "methods whose aggregate is a tensor average)")
    trim_fraction: float = option(0.1, "trimmed_mean: share of clients dropped at each end, per coordinate")

    def __post_init__(self) -> None:
        for k in ("norm_bound", "norm_bound_median_mult", "trim_fraction"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < float("inf"):
                raise ValueError(f"robust {k} must be a number ≥ 0, got {v!r}")
        if self.norm_bound and self.norm_bound_median_mult:
            raise ValueError("robust: set norm_bound (absolute) OR norm_bound_median_mult (× the round's median), "
                             "not both")
        if self.norm_bound_median_mult and self.norm_bound_median_mult < 1:
            raise ValueError(f"robust norm_bound_median_mult must be ≥ 1 (a bound below the median clips or rejects "
                             f"most honest clients), got {self.norm_bound_median_mult!r}; e.g. 3.0")
        if self.norm_action not in ACTIONS:
            raise ValueError(f"robust norm_action must be one of {ACTIONS}, got {self.norm_action!r}")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"robust aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        if not self.trim_fraction < 0.5:
            raise ValueError(f"robust trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.norm_bound or self.norm_bound_median_mult or self.aggregator != "mean")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | RobustConfig) -> RobustConfig:
        return d if isinstance(d, RobustConfig) else dataclass_from_dict(cls, d, "robust")


def coordinate_trimmed_mean(tensors: Sequence[torch.Tensor], trim: int) -> torch.Tensor:
    """Per coordinate: sort the K values, drop `trim` at each end, average the rest (float64 inside)."""
    k = len(tensors)
    if not 0 <= 2 * trim < k:
        raise ValueError(f"cannot trim {trim} of {k} values at each end")
    s = torch.stack([t.double() for t in tensors]).sort(dim=0).values
    return s[trim:k - trim].mean(dim=0).to(tensors[0].dtype)


class RobustAggregation(Wrapper):
    """Wraps `inner`: a method that declares how its update is measured (Capabilities.update_norm), possibly
    under client-level DP."""

    suffix = "robust"

    def __init__(self, inner: FedAlgorithm, robust: RobustConfig | dict[str, Any]) -> None:
        from fedtune.algorithms.wrappers.client_dp import ClientLevelDP

        rc = RobustConfig.from_dict(robust)
        super().__init__(inner)
        caps, method = inner.capabilities, self.method.name
        if caps.update_norm not in ("delta", "lora_product"):
            why = caps.robust_refusal or "it declares no update norm"
            raise ValueError(f"[robust] does not apply to {method!r}: {why}")
        self.norm_kind = caps.update_norm  # "delta": a tensor method's ‖u − w‖; "lora_product": ‖B·A‖
        if rc.aggregator != "mean" and not self.method.capabilities.tensor_average:
            why = self.method.capabilities.no_tensor_average or "its aggregate is not a tensor average"
            raise ValueError(f"[robust] aggregator = {rc.aggregator!r} is not available for {method}: {why}; use "
                             "norm_bound / norm_bound_median_mult, which bound each client's whole update")
        if isinstance(inner, ClientLevelDP) and (rc.aggregator != "mean" or rc.norm_bound_median_mult):
            raise ValueError("[robust] with client-level DP takes only an absolute norm_bound and aggregator = "
                             "\"mean\": the DP guarantee assumes each client's contribution is bounded by a constant "
                             "and summed; a median-relative bound or a trimmed mean/median lets one client's data "
                             "change how the others are counted (the DP clip_norm is already a norm bound)")
        self.robust = rc

    # ---- norms ------------------------------------------------------------------------------------
    def update_norm(self, state: GlobalState, u: ClientUpdate) -> float:
        return update_norm(self.norm_kind, state, u)

    def scale(self, state: GlobalState, u: ClientUpdate, c: float) -> ClientUpdate:
        """The update with its delta (tensor methods) or its B factors (FLoRA) scaled by c."""
        if self.norm_kind == "delta":
            t: TensorDict = {k: (state.tensors[k].double() + c * (v.double() - state.tensors[k].double())).to(v.dtype)
                             for k, v in u.tensors.items()}
        else:
            t = {k: (v.double() * c).to(v.dtype) if k.endswith(".B") else v for k, v in u.tensors.items()}
        return ClientUpdate(u.client_id, u.num_examples, t, dict(u.metrics))

    # ---- aggregate --------------------------------------------------------------------------------
    def aggregate(self, rnd: int, state: GlobalState, updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict]:
        if not updates:
            raise ValueError("aggregate called with no client updates")
        rc = self.robust
        norms = [self.update_norm(state, u) for u in updates]
        bound = rc.norm_bound or (rc.norm_bound_median_mult * float(torch.tensor(norms, dtype=torch.float64).median())
                                  if rc.norm_bound_median_mult else 0.0)
        kept, clipped, rejected = [], 0, 0
        for u, n in zip(updates, norms, strict=True):
            if not bound or n <= bound:
                kept.append(u)
            elif rc.norm_action == "reject":
                rejected += 1
            else:
                kept.append(self.scale(state, u, bound / n))
                clipped += 1
        if not kept:
            raise ValueError(f"robust: all {len(updates)} updates are above the norm bound {bound:g}; nothing to "
                             "aggregate")
        if rc.aggregator == "mean":
            new, metrics = self.inner.aggregate(rnd, state, kept)
        else:
            k = len(kept)
            trim = (k - 1) // 2 if rc.aggregator == "median" else int(rc.trim_fraction * k)
            combined = {key: coordinate_trimmed_mean([u.tensors[key] for u in kept], trim) for key in kept[0].tensors}
            # one synthetic update: the method's own aggregate of it builds the new state (weights 1)
            new, metrics = self.inner.aggregate(rnd, state, [ClientUpdate(f"{rc.aggregator}-of-{k}", 1, combined)])
        metrics = dict(metrics, robust_clipped=float(clipped), robust_rejected=float(rejected),
                       robust_bound=float(bound))
        return new, metrics
