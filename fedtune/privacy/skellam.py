"""Accounting for distributed DP: the (Poisson-subsampled) multi-dimensional Skellam mechanism, composed over rounds.

Skellam mechanism (Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated Learning",
NeurIPS 2021, Theorem 3.5): an integer vector with L2 / L1 sensitivities Δ₂, Δ₁ plus Sk(0, μ) noise per coordinate
(Poisson(μ/2) − Poisson(μ/2), variance μ) is (α, ε(α))-RDP for every integer α > 1 with

    ε(α) ≤ α·Δ₂²/(2μ) + min( ((2α − 1)·Δ₂² + 6·Δ₁) / (4μ²),  3·Δ₁/(2μ) )

As μ/Δ₂² = σ² stays fixed and Δ₂ → ∞ the second term vanishes: the Gaussian mechanism's α/(2σ²).

Sampling clients with probability q (Poisson) amplifies it; for a mechanism other than the Gaussian we use the general
upper bound of Zhu & Wang ("Poisson Subsampled Rényi Differential Privacy", ICML 2019, Theorem 6), integer α:

    ε_q(α) ≤ 1/(α−1) · log[ (1−q)^(α−1)·(αq − q + 1) + C(α,2)·q²·(1−q)^(α−2)·e^(ε(2))
                           + 3·Σ_{l=3..α} C(α,l)·q^l·(1−q)^(α−l)·e^((l−1)·ε(l)) ]

(and never more than ε(α)). It is looser than the exact sampled-Gaussian analysis opacus uses for the other modes,
so at q < 1 distributed DP reports a somewhat larger ε than central DP for the same noise; at q = 1 (every client every
round, the usual cross-organisation case) the two agree up to the second term. RDP adds over rounds; the conversion to
(ε, δ) is opacus' (Balle et al. 2020). Each round is recorded with the noise that was actually summed: fewer surviving
clients, less noise, a larger ε.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

MECHANISM = "skellam"
ORDERS: tuple[int, ...] = tuple(range(2, 65)) + tuple(range(72, 257, 8))  # integer orders (the sampled bound needs them)


def skellam_rdp(alpha: int, l2: float, l1: float, mu: float) -> float:
    """ε(α) of the Skellam mechanism (Theorem 3.5 above): sensitivities `l2`, `l1` and noise variance `mu`, all in the
    integer units the noise is added in."""
    if not (alpha > 1 and mu > 0 and l2 >= 0 and l1 >= 0):
        raise ValueError(f"skellam_rdp needs α > 1, μ > 0, Δ ≥ 0; got α={alpha}, μ={mu}, Δ₂={l2}, Δ₁={l1}")
    return alpha * l2**2 / (2 * mu) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def subsampled_rdp(alpha: int, q: float, eps) -> float:
    """ε_q(α) for Poisson sampling with probability q of a mechanism whose RDP is `eps(l)` (Zhu & Wang's general upper
    bound above, capped by the unsampled ε(α)). `alpha` an integer ≥ 2."""
    if not (isinstance(alpha, int) and alpha >= 2 and 0 < q <= 1):
        raise ValueError(f"subsampled_rdp needs an integer α ≥ 2 and q in (0, 1]; got α={alpha}, q={q}")
    full = eps(alpha)
    if q == 1:
        return full
    lq, l1q = math.log(q), math.log1p(-q)
    terms = [(alpha - 1) * l1q + math.log(alpha * q - q + 1),
             _log_comb(alpha, 2) + 2 * lq + (alpha - 2) * l1q + eps(2)]
    terms += [math.log(3) + _log_comb(alpha, j) + j * lq + (alpha - j) * l1q + (j - 1) * eps(j)
              for j in range(3, alpha + 1)]
    top = max(terms)
    return min(full, (top + math.log(sum(math.exp(t - top) for t in terms))) / (alpha - 1))


def round_rdp(q: float, l2: float, l1: float, mu: float, orders: Sequence[int] = ORDERS) -> np.ndarray:
    """The RDP curve of one round: the Skellam mechanism (Δ₂, Δ₁, μ) under Poisson sampling q, at `orders`."""
    return np.array([subsampled_rdp(a, q, lambda j: skellam_rdp(j, l2, l1, mu)) for a in orders])


def rdp_to_epsilon(rdp: Sequence[float], delta: float, orders: Sequence[int] = ORDERS) -> float:
    """(ε at δ) from an RDP curve: opacus' conversion (Balle et al. 2020, Theorem 21)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    with warnings.catch_warnings():  # "optimal order is the largest alpha": ε is still a valid upper bound
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)
    return float(eps)


class SkellamAccountant:
    """Composition of Skellam rounds. History: [[q, Δ₂, Δ₁, μ, rounds], ...] (consecutive equal rounds merged);
    JSON-able through state_dict, so it lives in the checkpoint (GlobalState.meta)."""

    mechanism = MECHANISM

    def __init__(self) -> None:
        self.history: list[list[float]] = []

    def step(self, q: float, l2: float, l1: float, mu: float, rounds: int = 1) -> None:
        if rounds < 0:
            raise ValueError(f"rounds must be ≥ 0, got {rounds}")
        if rounds == 0:
            return
        key = [float(q), float(l2), float(l1), float(mu)]
        if self.history and self.history[-1][:4] == key:
            self.history[-1][4] += rounds
        else:
            self.history.append([*key, rounds])

    @property
    def rounds(self) -> int:
        return int(sum(h[4] for h in self.history))

    def rdp(self) -> np.ndarray:
        total = np.zeros(len(ORDERS))
        for q, l2, l1, mu, n in self.history:
            total += n * round_rdp(q, l2, l1, mu)
        return total

    def epsilon(self, delta: float) -> float:
        """ε spent at δ (0 before any round)."""
        return rdp_to_epsilon(self.rdp(), delta) if self.history else 0.0

    def epsilon_after(self, delta: float, q: float, l2: float, l1: float, mu: float, rounds: int = 1) -> float:
        """ε if `rounds` more rounds with this noise were composed (self is unchanged)."""
        return rdp_to_epsilon(self.rdp() + rounds * round_rdp(q, l2, l1, mu), delta)

    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "history": [list(h[:4]) + [int(h[4])] for h in self.history]}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> SkellamAccountant:
        acc = cls()
        if not state:
            return acc
        if state.get("mechanism") != MECHANISM:
            raise ValueError(f"accountant state is for {state.get('mechanism')!r}, not {MECHANISM!r} "
                             "(a checkpoint of another [privacy] mode)")
        acc.history = [[float(q), float(l2), float(l1), float(mu), int(n)] for q, l2, l1, mu, n in state["history"]]
        return acc
