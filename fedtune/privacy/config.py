"""[privacy] section of a run config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedtune.configbase import dataclass_from_dict

MODES = ("none", "sample", "client", "distributed")
ACCOUNTANTS = ("rdp", "prv")


@dataclass
class PrivacyConfig:
    """Differential privacy settings. `mode`: "none", "sample" (DP-SGD inside each client, protects each
    training example), "client" (server-side DP-FedAvg, protects each client's whole dataset) or "distributed"
    (client-level DP whose noise the clients add under secure aggregation: the coordinator never sees an un-noised
    sum)."""

    mode: str = field(default="none", metadata={"help": "none | sample | client | distributed (needs [secagg])"})
    noise_multiplier: float | None = field(default=None, metadata={"help": "σ; set this OR target_epsilon"})
    target_epsilon: float | None = field(default=None, metadata={"help": "ε budget; σ is calibrated to it"})
    delta: float | None = field(default=None, metadata={
        "help": "δ; default sample: min(1/N_k, 1e-5), client: min(1/num_clients, 1e-5)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "sample mode: per-example clipping norm C"})
    clip_norm: float = field(default=1.0, metadata={"help": "client, distributed mode: per-update L2 clipping norm C"})
    accountant: str = field(default="rdp", metadata={"help": "rdp | prv (opacus accountants)"})
    noise_seed: int | None = field(default=None, metadata={
        "help": "sample mode: seed the DP noise (simulation only; None = OS randomness). "
                "client mode: overrides the run seed for the server noise"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"privacy mode must be one of {MODES}, got {self.mode!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        for name in ("max_grad_norm", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"privacy {name} must be > 0, got {getattr(self, name)!r} (e.g. {name} = 1.0)")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"privacy delta must be in (0, 1), got {self.delta!r} (e.g. delta = 1e-5)")
        if self.mode == "none":
            return
        if self.mode == "distributed" and self.noise_seed is not None:
            raise ValueError("privacy noise_seed does not apply to mode \"distributed\": each client draws its noise "
                             "from the OS; remove noise_seed")
        if self.mode == "distributed" and self.accountant != "rdp":
            raise ValueError("privacy mode \"distributed\" accounts the Skellam mechanism with its own RDP accountant; "
                             "set accountant = \"rdp\"")
        # σ only: fixed noise, ε reported. target_epsilon only: σ calibrated so the planned rounds spend
        # exactly the budget. Both: fixed σ, and training stops before the round that would exceed the budget.
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                f"privacy mode {self.mode!r} needs noise_multiplier (σ, e.g. 1.0), target_epsilon (ε budget, "
                "e.g. 8.0) or both (fixed σ, stop before the budget is exceeded)")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ValueError(f"privacy noise_multiplier must be ≥ 0, got {self.noise_multiplier!r}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"privacy target_epsilon must be > 0, got {self.target_epsilon!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def sample_delta(self, num_examples: int) -> float:
        """δ for sample-level DP of a client holding `num_examples` examples."""
        return self.delta if self.delta is not None else min(1.0 / max(num_examples, 1), 1e-5)

    def client_delta(self, num_clients: int) -> float:
        """δ for client-level (and distributed) DP over `num_clients` clients."""
        return self.delta if self.delta is not None else min(1.0 / max(num_clients, 1), 1e-5)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; this is what travels to clients as train config["privacy"]."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | PrivacyConfig) -> PrivacyConfig:
        return d if isinstance(d, PrivacyConfig) else dataclass_from_dict(cls, d, "privacy")
