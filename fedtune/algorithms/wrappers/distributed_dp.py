"""Distributed DP: client-level DP-FedAvg whose noise the clients add, in the ring, before secure aggregation masks
their vectors ([privacy] mode = "distributed", needs [secagg]). No one, the coordinator included, sees an un-noised
sum (Kairouz, Liu, Steinke, ICML 2021; Agarwal, Kairouz, Liu, NeurIPS 2021, the Skellam mechanism).

    client k:     q_k = CondRound(s·clip_C(Δ_k)) + Sk(μ),   μ = σ²·Δ₂² / t           (fedtune.secagg.noise)
    coordinator:  θ_g' = θ_g + (Σ_{k∈S} q_k / s) / m                                 (the unmasked sum, S the survivors)

t = the fewest survivors a round commits with ([secagg] min_survivors, [federation] min_clients), so the summed noise
Sk(|S|·μ) has standard deviation ≥ σ·Δ₂. Each round is charged to the Skellam accountant (fedtune.privacy.skellam) with
the noise actually summed, |S|·μ: a round where fewer clients survive costs more ε. The plan (s, μ, Δ₂, Δ₁, the ring)
is fixed once per run, at initialize, from the update's length d, and kept in GlobalState.meta["ddp"].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedtune.algorithms.api import ClientUpdate, FedAlgorithm, GlobalState, Part
from fedtune.algorithms.wrappers.client_dp import META_ACCOUNTANT, ClientLevelDP
from fedtune.privacy.config import PrivacyConfig
from fedtune.privacy.skellam import SkellamAccountant, rdp_to_epsilon, round_rdp
from fedtune.secagg.encode import EncodingError, length
from fedtune.secagg.noise import LAMBDA_MAX, NoiseParams, l1_bound, ring_holds, rounded_l2_bound

META_PLAN = "ddp"
MAX_INFLATION = 1e-2  # Δ₂ / (s·C) − 1 above this: the ring is too small to encode the vector finely enough
GOOD_INFLATION = 1e-3  # what the plan aims for (auto bits: the 32-bit ring when it reaches this)
MAX_DRAWS = 64  # Poisson draws per noise value the plan may ask for (μ/2 ≤ MAX_DRAWS · LAMBDA_MAX)


def _log_search(ok, lo: float, hi: float, iters: int = 60) -> float:
    """The largest x in [lo, hi] with ok(x) (ok monotone: true below some point), by bisection in log space; lo when
    none."""
    if ok(hi):
        return hi
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = (a + b) / 2
        a, b = (mid, b) if ok(math.exp(mid)) else (a, mid)
    return math.exp(a)


def plan_noise(sigma: float, C: float, clip: float, d: int, n_max: int, t_min: int, bits: int) -> NoiseParams:
    """The run's noise parameters: the scale s with L2 inflation Δ₂/(sC) − 1 ≤ GOOD_INFLATION where the ring allows,
    with n_max clients' noised sum fitting a `bits` ring, and μ = σ²Δ₂²/t_min. EncodingError when the ring cannot
    encode the vector within MAX_INFLATION (it says what to change)."""
    if not (sigma > 0 and C > 0 and clip > 0 and d > 0 and 1 <= t_min <= n_max):
        raise ValueError(f"plan_noise needs σ, C, clip, d > 0 and 1 ≤ t ≤ n; got σ={sigma}, C={C}, clip={clip}, d={d}, "
                         f"t={t_min}, n={n_max}")

    def params(s: float) -> NoiseParams:
        l2 = rounded_l2_bound(s * C, d)
        return NoiseParams(s, sigma**2 * l2**2 / t_min, l2)

    def inflation(s: float) -> float:
        return params(s).l2_bound / (s * C) - 1

    def fits(s: float) -> bool:
        p = params(s)
        return (s * C <= 2.0**50 and (s * C + math.sqrt(d)) ** 2 <= 2.0**62 and p.mu / 2 <= MAX_DRAWS * LAMBDA_MAX
                and ring_holds(p, clip, n_max, d, bits))

    lo = 1.0 / C  # s·C = 1: the coarsest encoding worth trying
    if not fits(lo):
        raise EncodingError(f"distributed DP: a {bits}-bit ring cannot hold the noised sum of {n_max} clients at any "
                            "scale; use [secagg] bits = 64 or fewer clients per round")
    s_max = _log_search(fits, lo, 2.0**50 / C)
    one_draw = _log_search(lambda s: params(s).mu / 2 <= LAMBDA_MAX, lo, s_max)  # cheap noise where precise enough
    s = one_draw if inflation(one_draw) <= GOOD_INFLATION else s_max
    if inflation(s) > GOOD_INFLATION:  # the smallest scale that reaches the aim, if the ring allows one
        s = min(s_max, 1.0 / _log_search(lambda r: inflation(1.0 / r) <= GOOD_INFLATION, 1.0 / s_max, 1.0 / lo))
    if inflation(s) > MAX_INFLATION:
        raise EncodingError(f"distributed DP: a {bits}-bit ring encodes a {d}-number update of {n_max} clients only "
                            f"with {inflation(s):.1%} more L2 sensitivity than C; use [secagg] bits = 64")
    return params(s)


class DistributedDP(ClientLevelDP):
    """`inner` (a tensor average with a secure sum) under distributed DP; replaces initialize (the plan and the
    Skellam accountant), aggregate (refused: it needs secure aggregation) and apply_secure (no coordinator noise)."""

    suffix = "distributed_dp"
    mode = "distributed"

    def __init__(self, inner: FedAlgorithm, privacy: PrivacyConfig | dict[str, Any], *, clients_per_round: int,
                 num_clients: int, rounds: int | None = None, min_survivors: int, bits: int = 0,
                 train: dict[str, Any] | None = None, clip: float = 1.0) -> None:
        if not inner.capabilities.secure_sum:
            raise ValueError(f"distributed DP needs a secure sum; {inner.name!r} has none "
                             f"({inner.capabilities.no_secure_sum or 'not declared'})")
        self.t_min = max(1, min(min_survivors, clients_per_round))
        self.bits, self.train, self.clip = bits, dict(train or {}), clip
        super().__init__(inner, privacy, clients_per_round=clients_per_round, num_clients=num_clients, rounds=rounds)
        if self.privacy.noise_multiplier is not None and not self.privacy.noise_multiplier > 0:
            raise ValueError("distributed DP needs noise: noise_multiplier > 0 (or target_epsilon)")

    def _calibrate(self) -> None:  # σ depends on the update's length: fixed at initialize (plan)
        if self.privacy.noise_multiplier is None and not self.rounds:
            raise ValueError("distributed DP with target_epsilon needs the planned number of rounds (rounds=...)")
        self.noise_multiplier = self.privacy.noise_multiplier or 0.0

    # ---- the plan --------------------------------------------------------------------------------------------
    def _round_rdp(self, plan: Mapping[str, float], survivors: int):
        return round_rdp(self.sample_rate, plan["l2_bound"], plan["l1_bound"], survivors * plan["mu"])

    def make_plan(self, state: GlobalState) -> dict[str, float]:
        """σ (configured, or the smallest that spends target_epsilon over the planned rounds with t survivors each),
        the ring (configured, or 32 bits when it encodes finely enough) and the noise (plan_noise)."""
        layout = self.secure_layout(state, self.train, self.clip)
        if any(p.integer for p in layout):
            raise ValueError(f"distributed DP cannot noise {self.inner.name!r}'s integer parts (counts)")
        d, clip, C, n = length(layout), max(p.clip for p in layout), self.privacy.clip_norm, self.clients_per_round

        def plan_for(sigma: float) -> dict[str, float]:
            for bits in (self.bits,) if self.bits else (32, 64):
                try:
                    noise = plan_noise(sigma, C, clip, d, n, self.t_min, bits)
                except EncodingError:
                    if bits == 64 or self.bits:
                        raise
                    continue
                if self.bits or bits == 64 or noise.l2_bound / (noise.scale * C) - 1 <= GOOD_INFLATION:
                    return {**noise.to_dict(), "bits": bits, "sigma": sigma, "d": d, "t_min": self.t_min,
                            "l1_bound": l1_bound(noise.l2_bound, d)}
            raise AssertionError("unreachable")

        pc = self.privacy
        if pc.noise_multiplier is not None:
            return plan_for(pc.noise_multiplier)

        def eps(sigma: float) -> float:
            return rdp_to_epsilon(self.rounds * self._round_rdp(plan_for(sigma), self.t_min), self.delta)

        lo, hi = 1e-2, 1.0
        while eps(hi) > pc.target_epsilon:  # bracket: ε falls as σ grows
            lo, hi = hi, hi * 2
            if hi > 1e4:
                raise ValueError(f"distributed DP: no σ ≤ 1e4 reaches target_epsilon = {pc.target_epsilon} in "
                                 f"{self.rounds} rounds")
        for _ in range(60):  # bisection on log σ: ε falls as σ grows
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if eps(mid) > pc.target_epsilon else (lo, mid)
            if hi / lo < 1.001:
                break
        return plan_for(hi)

    def plan(self, state: GlobalState) -> dict[str, float]:
        p = state.meta.get(META_PLAN)
        if p is None:
            raise ValueError("distributed DP: the global state has no noise plan (a checkpoint of another mode?)")
        return p

    def initialize(self, model: nn.Module, *, seed: int) -> GlobalState:
        state = self.inner.initialize(model, seed=seed)
        meta = dict(state.meta)
        meta[META_ACCOUNTANT] = SkellamAccountant().state_dict()
        meta[META_PLAN] = self.make_plan(state)
        return GlobalState(version=state.version, tensors=state.tensors, meta=meta)

    def secure_layout(self, state: GlobalState, train: dict[str, Any], clip: float) -> tuple[Part, ...]:
        layout = super().secure_layout(state, train, clip)
        if (p := state.meta.get(META_PLAN)) is not None and length(layout) != p["d"]:
            raise ValueError(f"distributed DP: this round's update has {length(layout)} numbers; the noise was planned "
                             f"for {p['d']}")
        return layout

    def secure_noise(self, state: GlobalState) -> tuple[int, NoiseParams]:
        p = self.plan(state)
        return int(p["bits"]), NoiseParams(p["scale"], p["mu"], p["l2_bound"])

    # ---- privacy ----------------------------------------------------------------------------------------------
    def accountant(self, state: GlobalState) -> SkellamAccountant:  # type: ignore[override]
        return SkellamAccountant.from_state(state.meta.get(META_ACCOUNTANT))

    def would_exceed_budget(self, state: GlobalState) -> bool:
        """True if one more round with the fewest survivors would push ε above target_epsilon."""
        if self.privacy.target_epsilon is None:
            return False
        p = self.plan(state)
        rdp = self.accountant(state).rdp() + self._round_rdp(p, self.t_min)
        return rdp_to_epsilon(rdp, self.delta) > self.privacy.target_epsilon

    def apply_secure(self, rnd: int, state: GlobalState, parts: Mapping[str, torch.Tensor],
                     updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict[str, float]]:
        """θ_g' = θ_g + (the unmasked noised sum) / m; one accountant round with the survivors' summed noise."""
        p, survivors = self.plan(state), len(updates)
        if survivors < self.t_min:
            raise ValueError(f"distributed DP: {survivors} survivors, fewer than the {self.t_min} the noise is planned for")
        means = {k: v.to(torch.float64) / self.clients_per_round for k, v in sorted(parts.items())}
        new, metrics = self.inner.apply_secure(rnd, state, means, updates)
        acc = self.accountant(state)
        acc.step(self.sample_rate, p["l2_bound"], p["l1_bound"], survivors * p["mu"])
        meta = dict(new.meta)
        meta[META_ACCOUNTANT] = acc.state_dict()
        sigma = math.sqrt(survivors * p["mu"]) / p["l2_bound"]  # the realised noise multiplier
        return (GlobalState(version=new.version, tensors=new.tensors, meta=meta),
                {**metrics, "epsilon": acc.epsilon(self.delta), "delta": self.delta, "noise_multiplier": sigma,
                 "ddp_bits": float(p["bits"])})

    def aggregate(self, rnd: int, state: GlobalState, updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict]:
        raise ValueError("distributed DP aggregates only through secure aggregation ([secagg] enabled = true): the "
                         "clients add the noise in the masked ring")
