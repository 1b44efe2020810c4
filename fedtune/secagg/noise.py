"""Distributed DP's encoding: each client rounds its clipped vector into the ring and adds its share of Skellam noise
before masking, so the coordinator only ever unmasks a noised sum (the accounting: fedtune.privacy.skellam).

    x, ‖x‖₂ ≤ C  →  q = CondRound(s·x)   stochastic rounding, redrawn until ‖q‖₂ ≤ Δ₂ (Kairouz, Liu, Steinke,
                                         "The Distributed Discrete Gaussian Mechanism", ICML 2021, Sec. 4.1):
                    Δ₂² = min((sC + √d)², (sC)² + d/4 + √(2 ln 1/β)·(sC + √d/2)),   β = e^(−1/2)
                 →  y = q + Sk(μ) per coordinate,  Sk(μ) = Poisson(μ/2) − Poisson(μ/2)   (Agarwal, Kairouz, Liu,
                                         "The Skellam Mechanism for Differentially Private Federated Learning",
                                         NeurIPS 2021)

Skellam noise is closed under summation: n clients each adding Sk(μ) give the sum Sk(n·μ), so with μ = σ²Δ₂²/t any
t or more survivors leave noise of standard deviation ≥ σ·Δ₂ in the sum. A neighbouring sum differs by one client's q:
‖q‖₂ ≤ Δ₂ always (the redraw), ‖q‖₁ ≤ Δ₂·min(√d, Δ₂) (integers). One scale s for the whole vector (the sensitivity
is over all of it); every coordinate |q_i| ≤ s·c + 1 with c the largest part clip.

Noise is unbounded, so "the sum cannot wrap" becomes: n·(s·c + 1) + a ≤ 2^(b−1) − 1 with `tail` a the Chernoff
bound P(some |Sk(n·μ)_i| > a) ≤ 2^−40 over the m coordinates (MGF of Sk(μ): exp(μ(cosh t − 1))).
Poisson draws use numpy's exact PTRS sampler; its float64 acceptance test needs λ = μ/2 well inside double precision,
so one draw has λ ≤ 2^34 and larger μ is the sum of independent draws (exact by closure).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedtune.secagg.encode import EncodingError, Layout, clipped_parts, ring_dtype

LAMBDA_MAX = 2.0**34  # the largest Poisson mean one draw uses
BETA = math.exp(-0.5)  # conditional rounding: P(redraw) ≤ β per draw
WRAP_LOG2 = 40  # P(the noised sum wraps the ring) ≤ 2^−40
MAX_REDRAWS = 200  # P(all fail) ≤ β^200 ≈ 1e-44


@dataclass(frozen=True)
class NoiseParams:
    """What the coordinator fixes for distributed DP, per run: the scale s, each client's Skellam variance μ (ring
    units), the L2 bound Δ₂ the rounded vector keeps. Travels in RoundParams."""

    scale: float
    mu: float
    l2_bound: float

    def to_dict(self) -> dict:
        return {"scale": self.scale, "mu": self.mu, "l2_bound": self.l2_bound}

    @classmethod
    def from_dict(cls, d: Mapping) -> NoiseParams:
        if not isinstance(d, Mapping) or set(d) != {"scale", "mu", "l2_bound"}:
            raise EncodingError("distributed-DP noise parameters need exactly scale, mu, l2_bound")
        vals = [d["scale"], d["mu"], d["l2_bound"]]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 2.0**62 for v in vals):
            raise EncodingError(f"distributed-DP noise parameters must be positive numbers below 2^62: {dict(d)}")
        return cls(*map(float, vals))


def rounded_l2_bound(sc: float, d: int) -> float:
    """Δ₂: the L2 norm conditional rounding keeps a vector of norm ≤ `sc` (= s·C) with `d` coordinates under."""
    a = (sc + math.sqrt(d)) ** 2
    b = sc**2 + d / 4 + math.sqrt(2 * math.log(1 / BETA)) * (sc + math.sqrt(d) / 2)
    return math.sqrt(min(a, b))


def l1_bound(l2: float, d: int) -> float:
    """Δ₁ of an integer vector with L2 norm ≤ l2 in d coordinates."""
    return l2 * min(math.sqrt(d), l2)


def tail(mu: float, m: int, log2_fail: int = WRAP_LOG2) -> float:
    """a with P(max_i |Sk(μ)_i| > a) ≤ 2^−log2_fail over m coordinates (Chernoff: P(Z ≥ a) ≤ exp(−g(a)),
    g(a) = a·asinh(a/μ) − (√(a² + μ²) − μ))."""
    if mu <= 0:
        return 0.0
    need = math.log(2 * max(m, 1)) + log2_fail * math.log(2)

    def g(a: float) -> float:
        return a * math.asinh(a / mu) - a * a / (math.sqrt(a * a + mu * mu) + mu)

    lo, hi = 0.0, math.sqrt(2 * mu * need) + need + 1
    while g(hi) < need:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if g(mid) < need else (lo, mid)
    return math.ceil(hi)


def ring_holds(noise: NoiseParams, clip: float, n: int, m: int, bits: int) -> bool:
    """Can a b-bit ring hold the noised sum of n clients' vectors (m coordinates, each |x_i| ≤ clip) without
    wrapping (up to 2^−40)?"""
    return n * (noise.scale * clip + 1) + tail(n * noise.mu, m) <= 2 ** (bits - 1) - 1


def skellam(size: int, mu: float, rng: np.random.Generator) -> np.ndarray:
    """Sk(μ) noise: `size` int64 values of variance μ (sums of draws with λ ≤ LAMBDA_MAX when μ/2 is larger)."""
    k = max(1, math.ceil(mu / 2 / LAMBDA_MAX))
    lam = mu / 2 / k
    out = np.zeros(size, dtype=np.int64)
    for _ in range(k):
        out += rng.poisson(lam, size)
        out -= rng.poisson(lam, size)
    return out


def conditional_round(sx: np.ndarray, l2_bound: float, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of the float64 vector sx (E q = sx), redrawn until ‖q‖₂ ≤ l2_bound (the norm in exact
    integer arithmetic; ‖q‖₂ ≤ ‖sx‖₂ + √d)."""
    fl = np.floor(sx)
    frac = sx - fl
    fl = fl.astype(np.int64)
    if (math.sqrt(float(np.dot(sx, sx))) + math.sqrt(sx.size)) ** 2 > 2.0**62:  # Σ q_i² must fit in int64
        raise EncodingError("distributed DP: the scaled vector is too large for exact rounding (scale too large)")
    bound_sq = math.floor(l2_bound**2)
    for _ in range(MAX_REDRAWS):
        q = fl + (rng.random(sx.shape) < frac)
        if int(np.dot(q, q)) <= bound_sq:
            return q
    raise EncodingError(f"conditional rounding found no rounding within L2 {l2_bound:.6g} in {MAX_REDRAWS} draws "
                        "(the round's noise parameters do not fit this vector)")


def encode_noised(parts: Mapping[str, np.ndarray], layout: Layout, noise: NoiseParams, bits: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(y = CondRound(s·x) + Sk(μ) in the ring [m], coordinates clipped). `parts` already scaled to L2 ≤ C."""
    if any(p.integer or p.weighted for p in layout):
        raise EncodingError("distributed DP sums unweighted real parts only")
    xs, clipped = clipped_parts(parts, layout)
    x = np.concatenate(xs) if xs else np.zeros(0)
    q = conditional_round(x * noise.scale, noise.l2_bound, rng)
    q += skellam(q.size, noise.mu, rng)
    return q.astype(ring_dtype(bits)), clipped
