"""Privacy accounting: a thin, checkpointable wrapper over opacus' accountants (no formulas of our own)."""

from __future__ import annotations

import copy
from typing import Any

# opacus is imported where it is used: it costs ~1.5 s per process start (scipy), which every run without DP
# (and every CLI command) would otherwise pay


class Accountant:
    """Tracks the composition of sampled Gaussian mechanisms. History: [(σ, q, steps), ...]."""

    def __init__(self, mechanism: str = "rdp") -> None:
        self.mechanism = mechanism
        from opacus.accountants import create_accountant

        self._acc = create_accountant(mechanism=mechanism)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._acc.history)

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self._acc.history)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record `num_steps` steps of the sampled Gaussian mechanism (merged like opacus' own step())."""
        if num_steps < 0:
            raise ValueError(f"num_steps must be ≥ 0, got {num_steps}")
        if num_steps == 0:
            return
        h = self._acc.history
        if h and h[-1][0] == noise_multiplier and h[-1][1] == sample_rate:
            h[-1] = (noise_multiplier, sample_rate, h[-1][2] + num_steps)
        else:
            h.append((float(noise_multiplier), float(sample_rate), int(num_steps)))

    def epsilon(self, delta: float) -> float:
        """ε spent so far at `delta` (0 before any step; inf for σ = 0)."""
        if not self._acc.history:
            return 0.0
        if any(sigma == 0 and q > 0 for sigma, q, _ in self._acc.history):
            return float("inf")
        return float(self._acc.get_epsilon(delta=delta))

    def epsilon_after(self, delta: float, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> float:
        """ε if `num_steps` more steps were taken; computed on a copy (self is unchanged)."""
        c = self.copy()
        c.step(noise_multiplier, sample_rate, num_steps)
        return c.epsilon(delta)

    def would_exceed(self, target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
                     num_steps: int = 1) -> bool:
        """Would `num_steps` more steps push ε above `target_epsilon`? (checked on a copy)."""
        return self.epsilon_after(delta, noise_multiplier, sample_rate, num_steps) > target_epsilon

    def copy(self) -> Accountant:
        c = Accountant(self.mechanism)
        c._acc.history = copy.deepcopy(self._acc.history)
        return c

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: {"mechanism", "history": [[σ, q, steps], ...]}."""
        return {"mechanism": self.mechanism, "history": [[float(s), float(q), int(n)] for s, q, n in self._acc.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mechanism", self.mechanism) != self.mechanism:
            raise ValueError(f"accountant state is for {state['mechanism']!r}, this accountant is {self.mechanism!r}")
        self._acc.history = [(float(s), float(q), int(n)) for s, q, n in state.get("history", [])]

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, mechanism: str = "rdp") -> Accountant:
        acc = cls((state or {}).get("mechanism", mechanism))
        if state:
            acc.load_state_dict(state)
        return acc


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp") -> float:
    """Smallest σ (opacus' binary search, tolerance 0.01) with ε(σ, q, steps) ≤ target_epsilon."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0 to calibrate noise, got {steps}")
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))
