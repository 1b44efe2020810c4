from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedtune.algorithms.fedavg.config import FedAvgConfig


@dataclass
class FedProxConfig(FedAvgConfig):
    """[fedprox] settings ([lora] keys apply too): FedAvg's, and μ."""

    mu: float = field(default=0.01, metadata={
        "help": "μ of the proximal term (μ/2)·‖w − w_global‖²; 0: FedAvg (the paper tries 0.001, 0.01, 0.1, 1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.mu, bool) or not isinstance(self.mu, int | float) or not 0 <= self.mu <= 1e6 \
                or not math.isfinite(self.mu):
            raise ValueError(f"fedprox mu must be a number in [0, 1e6], got {self.mu!r} (e.g. mu = 0.01)")
