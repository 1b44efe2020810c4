"""FedKSeed server side: per-seed accumulation of the clients' scalar gradients (see package docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from fedtune.algorithms.api import (
    Bound,
    Capabilities,
    ClientUpdate,
    FedAlgorithm,
    GlobalState,
    MetricRange,
    Part,
    Payload,
    TensorSpec,
    UpdateSpec,
    example_weights,
    payload_nbytes,
)
from fedtune.algorithms.common.lora import lora_shapes
from fedtune.algorithms.fedkseed.client import FedKSeedClient
from fedtune.algorithms.fedkseed.config import FedKSeedConfig, hardware_problem
from fedtune.algorithms.fedkseed.shared import ABS_SUM, COUNT, PROBS, candidate_seeds, round_key


def seed_probabilities(abs_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Probabilities of "pro" sampling: softmax(minmax(mean |clip(g)| per seed)); unseen seeds: mean 0. f32 [K]."""
    mean = torch.where(count > 0, abs_sum / count.clamp(min=1), torch.zeros_like(abs_sum))  # float64 [K]
    span = mean.max() - mean.min()
    norm = (mean - mean.min()) / span if span > 0 else torch.zeros_like(mean)
    return torch.softmax(norm, 0).float()


class FedKSeed(FedAlgorithm):
    name = "fedkseed"
    config_class = FedKSeedConfig
    state_format = 2  # 2: z(seed) drawn in seeded 2^20-number blocks (1: one stream), so replayed pairs mean another θ
    # Sample-level DP clips each example's projected gradient and noises the step's scalar (client.py).
    CAPABILITIES = Capabilities(
        exact=True,  # replay is linear in g: the sum of each client's steps weighted by p_k (weight decay 0)
        no_tensor_average=(
            "a FedKSeed update is τ (seed, scalar) pairs and the global state is the log of per-seed sums, not a "
            "model delta; hiding a client's participation would need noise on all K per-seed sums every round, "
            "since the set of seeds used reveals who took part, so every client would replay K z regenerations "
            "per round instead of the seeds actually used"),
        robust_refusal="its update is not a fixed-shape tensor delta (fedkseed: each step's scalar is already "
                       "clamped by [fedkseed] grad_clip)",
        secure_sum=True)  # each client's pairs, densified into per-seed sums h[s] (secure_layout)
    train_fields: ClassVar[Mapping[str, Bound]] = {"eps": Bound("float", 0.0, 1.0, lo_open=True),  # the SPSA perturbation scale
                    "grad_clip": Bound("float", 0.0, 1e6),
                    "seed_sampling": Bound("choice", choices=("uniform", "pro"))}
    metric_ranges: ClassVar[Mapping[str, MetricRange]] = {"zo_clipped_frac": (0.0, 1.0, False), "zo_skipped_steps": (0.0, 2.0**31, False)}
    config: FedKSeedConfig

    @property
    def capabilities(self) -> Capabilities:
        """Full-parameter ZO perturbs the base's own weights: not on a 4/8-bit base, and the result is the merged
        model; "lora" trains float32 factors on any base and exports an adapter."""
        if self.config.trainable == "lora":
            return self.CAPABILITIES
        return dataclasses.replace(self.CAPABILITIES, holdings=frozenset({"float32", "bfloat16", "float16"}),
                                   export="merged")

    def holding_problem(self, quantization: str, dtype: str) -> str | None:
        return hardware_problem(self.config.trainable, quantization)

    @classmethod
    def quick_settings(cls) -> dict[str, Any]:
        """η = 1e-3: the 0.1M-parameter tiny model tolerates it (the default 1e-6 is sized for ~135M weights)."""
        return {"lr": 1e-3, "num_seeds": 256}

    def initialize(self, model: nn.Module, *, seed: int) -> GlobalState:
        c = self.config
        if c.trainable == "lora":
            lora_shapes(model, c.target_modules)  # fail early on bad targets
        candidate_seeds(c.num_seeds, seed)  # fail early on a duplicate; clients derive the same K seeds themselves
        tensors: dict[str, torch.Tensor] = {}
        if c.seed_sampling == "pro":
            tensors[ABS_SUM] = torch.zeros(c.num_seeds, dtype=torch.float64)
            tensors[COUNT] = torch.zeros(c.num_seeds, dtype=torch.int64)
            tensors[PROBS] = torch.full((c.num_seeds,), 1.0 / c.num_seeds)
        return GlobalState(version=0, tensors=tensors, meta={"lora_seed": seed, "seed_set": seed, "lr": c.lr})

    def setup_payload(self, state: GlobalState) -> Payload:
        c = self.config
        # one seed instead of K int64: the client draws the K candidates itself (candidate_seeds), 33 KB → ~0.2 KB
        meta = {"algorithm": self.name, "trainable": c.trainable, "lora_seed": state.meta["lora_seed"],
                "num_seeds": c.num_seeds, "seed_set": state.meta["seed_set"]}
        if c.trainable == "lora":
            meta.update(rank=c.rank, alpha=c.alpha, target_modules=list(c.target_modules))
        return Payload(meta=meta)

    def sync_payload(self, state: GlobalState, from_version: int) -> Payload:
        """The (seed_idx, coeff) pairs of rounds from_version+1 … state.version, to replay in order."""
        versions = list(range(max(from_version + 1, 1), state.version + 1))
        tensors = {round_key(v, k): state.tensors[round_key(v, k)] for v in versions for k in ("seed_idx", "coeff")}
        if PROBS in state.tensors:
            tensors[PROBS] = state.tensors[PROBS]
        return Payload(tensors=tensors, meta={"replay_versions": versions, "version": state.version})

    def configure_round(self, rnd, state, client_ids, base_train, roster) -> dict[str, dict[str, Any]]:
        c = self.config  # η is the method's own: the run's generic (AdamW-sized) lr does not apply to ZO
        zo = {"lr": c.lr, "eps": c.eps, "grad_clip": c.grad_clip, "seed_sampling": c.seed_sampling}
        return {cid: dict(base_train, **zo) for cid in client_ids}

    def expected_update(self, state: GlobalState, train: dict) -> UpdateSpec:
        """τ = steps (seed index, projected gradient) pairs: indices in [0, K); |g| ≤ grad_clip when the
        client clips and adds no noise."""
        tau, c = int(train["steps"]), self.config
        clip = float(train.get("grad_clip", 0.0))
        noisy = float(train.get("dp_noise_multiplier", 0.0)) > 0
        return UpdateSpec({
            "seed_idx": TensorSpec((tau,), torch.int32, (0, c.num_seeds - 1)),
            "grad": TensorSpec((tau,), torch.float32, (-clip, clip) if clip > 0 and not noisy else None),
        })

    def aggregate(self, rnd: int, state: GlobalState, updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict]:
        c = self.config
        p = example_weights(updates, uniform=c.uniform)
        acc = torch.zeros(c.num_seeds, dtype=torch.float64)  # H[s] = Σ_k p_k Σ_{t: s_kt = s} g_kt
        used = torch.zeros(c.num_seeds, dtype=torch.bool)
        for pk, u in zip(p, updates):
            idx, g = self._check(u)
            acc.index_add_(0, idx, g * pk)
            used[idx] = True
        nz = used.nonzero().squeeze(1)  # sorted seed indices used this round
        v = state.version + 1
        tensors = dict(state.tensors)
        tensors[round_key(v, "seed_idx")] = nz.to(torch.int32)  # [n]
        tensors[round_key(v, "coeff")] = (c.lr * acc[nz]).float()  # η·H[s], [n]
        if c.seed_sampling == "pro":
            self._update_pro(tensors, updates)
        up = [payload_nbytes(u.tensors) for u in updates]
        down = nz.numel() * 8 + (c.num_seeds * 4 if c.seed_sampling == "pro" else 0)
        grads = torch.cat([u.tensors["grad"].double() for u in updates])
        metrics = {
            "fedkseed_bytes_up_per_client": sum(up) / len(up),
            "fedkseed_bytes_down_per_client": float(down),
            "fedkseed_unique_seeds": float(nz.numel()),
            "fedkseed_grad_abs_mean": float(grads.abs().mean()),
        }
        return GlobalState(version=v, tensors=tensors, meta=dict(state.meta)), metrics

    # -- secure aggregation: a client's τ pairs become h[s] = Σ_{t: s_t = s} g_t over the K seeds (and, for "pro",
    # Σ |clip(g, ±pro_clip)| and the step count per seed); Σ_k p_k h_k is exactly aggregate's H.
    def secure_layout(self, state: GlobalState, train: dict, clip: float) -> tuple[Part, ...]:
        """h [K] weighted, bounded by τ·grad_clip (τ·clip when grad_clip = 0); "pro" adds abs [K] ≤ τ·pro_clip and
        count [K] ≤ τ, plain sums (the pro statistics are not weighted)."""
        c, tau = self.config, int(train["steps"])
        g = float(train.get("grad_clip", 0.0)) or clip
        parts = [Part("h", (c.num_seeds,), tau * g)]
        if c.seed_sampling == "pro":
            parts += [Part("abs", (c.num_seeds,), tau * c.pro_clip, weighted=False),
                      Part("count", (c.num_seeds,), float(tau), weighted=False, integer=True)]
        return tuple(parts)

    def apply_secure(self, rnd: int, state: GlobalState, parts: Mapping[str, torch.Tensor],
                     updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict]:
        c, v = self.config, state.version + 1
        acc = parts["h"].to(torch.float64)
        nz = (acc != 0).nonzero().squeeze(1)  # an unused seed sums to exactly 0 (q = ⌊0 + U⌋ = 0)
        tensors = dict(state.tensors)
        tensors[round_key(v, "seed_idx")] = nz.to(torch.int32)
        tensors[round_key(v, "coeff")] = (c.lr * acc[nz]).float()
        metrics = {"fedkseed_unique_seeds": float(nz.numel()),
                   "fedkseed_bytes_down_per_client": float(nz.numel() * 8 + (c.num_seeds * 4 if "abs" in parts else 0))}
        if "abs" in parts:
            count = parts["count"].round().to(torch.int64)
            tensors[ABS_SUM] = tensors[ABS_SUM] + parts["abs"].to(torch.float64)
            tensors[COUNT] = tensors[COUNT] + count
            tensors[PROBS] = seed_probabilities(tensors[ABS_SUM], tensors[COUNT])
            if int(count.sum()):
                metrics["fedkseed_grad_abs_mean"] = float(parts["abs"].sum() / count.sum())  # of clip(g, ±pro_clip)
        return GlobalState(version=v, tensors=tensors, meta=dict(state.meta)), metrics

    def _check(self, u: ClientUpdate) -> tuple[torch.Tensor, torch.Tensor]:
        """(seed indices int64 [τ], grads float64 [τ]) of a validated update."""
        if set(u.tensors) != {"seed_idx", "grad"}:
            raise ValueError(
                f"update from {u.client_id} must hold exactly 'seed_idx' and 'grad', got {sorted(u.tensors)}"
            )
        idx, g = u.tensors["seed_idx"].long().reshape(-1), u.tensors["grad"].double().reshape(-1)
        if idx.numel() != g.numel():
            raise ValueError(f"update from {u.client_id}: {idx.numel()} seed indices but {g.numel()} grads")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.num_seeds):
            raise ValueError(f"update from {u.client_id} has seed indices outside [0, {self.config.num_seeds})")
        if not torch.isfinite(g).all():
            raise ValueError(f"update from {u.client_id} has non-finite projected gradients")
        return idx, g

    def _update_pro(self, tensors: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> None:
        """Accumulate |clip(g, ±pro_clip)| per seed over every client step so far; new probabilities."""
        abs_sum, count = tensors[ABS_SUM].clone(), tensors[COUNT].clone()
        for u in updates:
            idx = u.tensors["seed_idx"].long().reshape(-1)
            abs_sum.index_add_(
                0, idx, u.tensors["grad"].double().reshape(-1).clamp(-self.config.pro_clip, self.config.pro_clip).abs()
            )
            count.index_add_(0, idx, torch.ones_like(idx))
        tensors[ABS_SUM], tensors[COUNT] = abs_sum, count
        tensors[PROBS] = seed_probabilities(abs_sum, count)

    def make_client(self) -> FedKSeedClient:
        return FedKSeedClient()
