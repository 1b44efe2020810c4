from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fedtune.algorithms.common.lora import LoRAConfig


@dataclass
class FedAvgConfig(LoRAConfig):
    """[fedavg] settings ([lora] keys apply too)."""

    # lr sweep 3e-3 / 1e-2 / 3e-2 → final eval loss 2.143 / 1.922 / 8.18 (diverged) (base 3.372): 1e-2
    # (simulations/report.py, SmolLM2-135M, chatterbot by category, 4 clients × 5 rounds × 2 local steps, batch 4;
    # simulations/results/REPORT.md)
    DEFAULT_LR: ClassVar[float] = 1e-2
    uniform: bool = field(default=False, metadata={"help": "weight clients equally instead of by examples"})
