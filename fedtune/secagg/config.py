"""[secagg] section of a run config (docs/privacy-and-robustness.md, "Secure aggregation")."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fedtune.configbase import dataclass_from_dict


@dataclass
class SecAggConfig:
    """Secure aggregation: the coordinator learns only the sum of each round's updates."""

    enabled: bool = field(default=False, metadata={"help": "aggregate with SecAgg+ (fedavg, fedprox, fedsb, fedkseed)"})
    bits: int = field(default=0, metadata={"help": "ring size 32 or 64; 0: auto (64 up to 2^20 numbers per update, "
                                                   "else 32 when it holds the sum)"})
    clip: float = field(default=1.0, metadata={"help": "each coordinate of an update's change is clipped to ±clip"})
    threshold: float = field(default=2 / 3, metadata={
        "help": "share of a neighbourhood whose shares rebuild a secret (t); fewer than t colluding clients learn "
                "nothing, more than 1 − t of a neighbourhood may drop"})
    degree: int = field(default=0, metadata={"help": "neighbours per client; 0: all up to 50 clients, "
                                                     "max(20, 4·⌈log2 n⌉) above (SecAgg+)"})
    min_survivors: int = field(default=3, metadata={"help": "fewer summed clients: the attempt aborts (a sum of 1 "
                                                            "or 2 is an individual update)"})
    key_timeout_s: float = field(default=60.0, metadata={"help": "server: how long the key stages wait"})
    unmask_timeout_s: float = field(default=60.0, metadata={"help": "server: how long the unmask stage waits"})

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise TypeError(f"secagg enabled must be true or false, got {self.enabled!r}")
        if self.bits not in (0, 32, 64):
            raise ValueError(f"secagg bits must be 0 (auto), 32 or 64, got {self.bits!r}")
        if not (isinstance(self.clip, int | float) and 0 < self.clip < math.inf):
            raise ValueError(f"secagg clip must be > 0, got {self.clip!r}")
        if not 0.5 <= self.threshold <= 1:
            raise ValueError(f"secagg threshold must be in [0.5, 1], got {self.threshold!r}")
        if not (isinstance(self.degree, int) and self.degree >= 0):
            raise ValueError(f"secagg degree must be an integer ≥ 0 (0 = auto), got {self.degree!r}")
        if not (isinstance(self.min_survivors, int) and self.min_survivors >= 3):
            raise ValueError(f"secagg min_survivors must be an integer ≥ 3, got {self.min_survivors!r}")
        for k in ("key_timeout_s", "unmask_timeout_s"):
            if not getattr(self, k) > 0:
                raise ValueError(f"secagg {k} must be > 0, got {getattr(self, k)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | SecAggConfig) -> SecAggConfig:
        return d if isinstance(d, SecAggConfig) else dataclass_from_dict(cls, d, "secagg")
