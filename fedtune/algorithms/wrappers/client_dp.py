"""Client-level DP: DP-FedAvg with server-side fixed clipping (McMahan et al., 2018; Flower's
DifferentialPrivacyServerSideFixedClipping), wrapped around any method whose aggregate is a tensor average
(Capabilities.tensor_average).

    Δ_k = clip_C(θ_k − θ_g),   θ_g' = θ_g + (Σ_k Δ_k + N(0, σ²C² I)) / m

m = expected clients per round; each round is one step of the sampled Gaussian mechanism with
q = m / total clients. The accountant's history lives in GlobalState.meta["accountant"] (JSON).
Noise: seeded (run seed or noise_seed; reproducible simulations), or with os_noise (`fedtune server`
without noise_seed) drawn from a generator seeded with 128 bits from the OS each round, never stored.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedtune.algorithms.api import ClientUpdate, FedAlgorithm, GlobalState, Part, TensorDict
from fedtune.algorithms.registry import with_capability
from fedtune.algorithms.wrappers.base import Wrapper
from fedtune.privacy.accounting import Accountant, noise_for_target
from fedtune.privacy.config import PrivacyConfig

META_ACCOUNTANT = "accountant"
META_SEED = "dp_seed"


def clip_update(delta: TensorDict, clip_norm: float) -> tuple[TensorDict, float]:
    """Scale the whole update so its global L2 norm is ≤ clip_norm; returns (clipped, original norm)."""
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values()))) if delta else 0.0
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (t.double() * scale).to(t.dtype) for k, t in delta.items()}, norm


class ClientLevelDP(Wrapper):
    """Wraps `inner` (its aggregate must be a tensor average); replaces initialize (the accountant's state) and
    aggregate (clip, sum, noise)."""

    suffix = "client_dp"
    mode = "client"  # the [privacy] mode this wrapper implements

    def __init__(
        self, inner: FedAlgorithm, privacy: PrivacyConfig | dict[str, Any], *, clients_per_round: int,
        num_clients: int, rounds: int | None = None, os_noise: bool = False,
    ) -> None:
        if isinstance(inner, ClientLevelDP):
            raise TypeError("the algorithm is already wrapped with client-level DP")
        if not inner.capabilities.tensor_average:
            why = inner.capabilities.no_tensor_average or "its aggregate is not declared a tensor average"
            able = ", ".join(repr(n) for n in with_capability(lambda c: c.tensor_average))
            raise ValueError(
                f"client-level DP cannot wrap {inner.name!r}: its aggregate is not an average of fixed-shape "
                f"update tensors ({why}). Use a method whose aggregate is one ({able}), or sample-level DP "
                f"([privacy] mode = \"sample\") with {inner.name!r}.")
        pc = PrivacyConfig.from_dict(privacy)
        if pc.mode != self.mode:
            raise ValueError(f"{type(self).__name__} needs [privacy] mode = \"{self.mode}\", got {pc.mode!r}")
        if not 0 < clients_per_round <= num_clients:
            raise ValueError(f"need 0 < clients_per_round ≤ num_clients, got {clients_per_round} / {num_clients}")
        super().__init__(inner)
        self.privacy, self.os_noise = pc, os_noise
        self.clients_per_round, self.num_clients = clients_per_round, num_clients
        self.sample_rate = clients_per_round / num_clients
        self.delta = pc.client_delta(num_clients)
        self.rounds = rounds
        self._calibrate()

    def _calibrate(self) -> None:
        """σ: the configured noise_multiplier, or the smallest σ that spends target_epsilon over the planned rounds."""
        pc, rounds = self.privacy, self.rounds
        if pc.noise_multiplier is not None:
            self.noise_multiplier = pc.noise_multiplier
        elif not rounds:
            raise ValueError("client-level DP with target_epsilon needs the planned number of rounds (rounds=...)")
        else:
            self.noise_multiplier = noise_for_target(pc.target_epsilon, self.delta, self.sample_rate, rounds,
                                                     pc.accountant)

    def initialize(self, model: nn.Module, *, seed: int) -> GlobalState:
        state = self.inner.initialize(model, seed=seed)
        meta = dict(state.meta)
        meta[META_ACCOUNTANT] = Accountant(self.privacy.accountant).state_dict()
        if not self.os_noise:
            meta[META_SEED] = self.privacy.noise_seed if self.privacy.noise_seed is not None else seed
        return GlobalState(version=state.version, tensors=state.tensors, meta=meta)

    # ---- privacy ----------------------------------------------------------------------------------
    def accountant(self, state: GlobalState) -> Accountant:
        return Accountant.from_state(state.meta.get(META_ACCOUNTANT), self.privacy.accountant)

    def epsilon(self, state: GlobalState) -> float:
        return self.accountant(state).epsilon(self.delta)

    def would_exceed_budget(self, state: GlobalState) -> bool:
        """True if aggregating one more round would push ε above target_epsilon (False without a target)."""
        if self.privacy.target_epsilon is None:
            return False
        return self.accountant(state).would_exceed(self.privacy.target_epsilon, self.delta,
                                                    self.noise_multiplier, self.sample_rate)

    # ---- under secure aggregation: clients clip (L2 ≤ C), the coordinator noises the decoded sum ----------------
    @property
    def uniform_weights(self) -> bool:
        return True  # DP-FedAvg sums the clipped changes unweighted

    def secure_layout(self, state: GlobalState, train: dict[str, Any], clip: float) -> tuple[Part, ...]:
        """The inner method's parts as plain sums, each coordinate bounded by C (‖Δ‖₂ ≤ C bounds every coordinate)."""
        C = self.privacy.clip_norm
        return tuple(dataclasses.replace(p, weighted=False, clip=min(p.clip, C))
                     for p in self.inner.secure_layout(state, train, clip))

    def secure_l2_clip(self) -> float:
        return self.privacy.clip_norm

    def apply_secure(self, rnd: int, state: GlobalState, parts: Mapping[str, torch.Tensor],
                     updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict[str, float]]:
        """θ_g' = θ_g + (Σ_k clip_C(Δ_k) + N(0, σ²C²))/m from the decoded sum (the inner method's apply_secure takes
        the noised mean change), one accountant step as `aggregate`."""
        C, sigma = self.privacy.clip_norm, self.noise_multiplier
        z = self._noise_source(state, rnd)
        means = {k: (v.to(torch.float64) + z(tuple(v.shape)) * (sigma * C)) / self.clients_per_round
                 for k, v in sorted(parts.items())}
        new, metrics = self.inner.apply_secure(rnd, state, means, updates)
        return self._charge(state, new, sigma, metrics)

    def _noise_source(self, state: GlobalState, rnd: int):
        """shape ↦ standard normal float64 noise: from the run's seeded stream for this round, or (os_noise) from a
        generator seeded with 128 bits from the OS, never stored."""
        if self.os_noise:
            rng = np.random.default_rng(secrets.randbits(128))
            return lambda shape: torch.as_tensor(rng.standard_normal(shape), dtype=torch.float64)
        g = torch.Generator().manual_seed(int(state.meta.get(META_SEED, 0)) * 1_000_003 + rnd)
        return lambda shape: torch.randn(shape, generator=g, dtype=torch.float64)

    def _charge(self, state: GlobalState, new: GlobalState, sigma: float, metrics: dict) -> tuple[GlobalState, dict]:
        acc = self.accountant(state)
        acc.step(sigma, self.sample_rate)
        meta = dict(new.meta)
        meta[META_ACCOUNTANT] = acc.state_dict()
        return (GlobalState(version=new.version, tensors=new.tensors, meta=meta),
                {**metrics, "epsilon": acc.epsilon(self.delta), "delta": self.delta, "noise_multiplier": sigma})

    def aggregate(self, rnd: int, state: GlobalState, updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict]:
        if not updates:
            raise ValueError("aggregate called with no client updates")
        C, sigma = self.privacy.clip_norm, self.noise_multiplier
        # the tensors the updates replace (validated: every update carries the same ones); the others (Fed-SB's frozen
        # A, B) are not aggregated, so they are neither noised nor changed
        total = {k: torch.zeros_like(state.tensors[k], dtype=torch.float64) for k in updates[0].tensors
                 if k in state.tensors}
        for u in updates:
            extra = sorted(set(u.tensors) - set(state.tensors))
            if extra:
                raise ValueError(f"update from {u.client_id} has keys not in the global state: {extra[:3]}")
            delta = {k: u.tensors[k].double() - state.tensors[k].double() for k in sorted(u.tensors)}
            clipped, _ = clip_update(delta, C)  # raw norms are not private: never reported
            for k, t in clipped.items():
                total[k] += t
        z = self._noise_source(state, rnd)
        new: TensorDict = dict(state.tensors)
        for k in sorted(total):
            mean = (total[k] + z(tuple(total[k].shape)) * (sigma * C)) / self.clients_per_round
            new[k] = (state.tensors[k].double() + mean).to(state.tensors[k].dtype)
        return self._charge(state, GlobalState(version=state.version + 1, tensors=new, meta=dict(state.meta)), sigma, {})
