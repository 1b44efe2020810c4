from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fedtune.algorithms.api import MAX_RANK  # what clients accept

DEFAULT_TARGETS = ["q_proj", "v_proj"]


@dataclass
class LoRAConfig:
    """LoRA settings shared by LoRA-based methods ([lora] in a run config)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r (> 0)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scale s = alpha / r"})
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0
    lr: float | None = field(default=None, metadata={"help": "local AdamW lr; None = [train] lr, else DEFAULT_LR"})

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or not 0 < self.rank <= MAX_RANK:
            raise ValueError(f"lora rank must be a positive integer, got {self.rank!r} (at most {MAX_RANK}; e.g. rank = 8)")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r} (e.g. alpha = 2 * rank)")
        if not self.target_modules:
            raise ValueError("lora target_modules is empty; e.g. target_modules = [\"q_proj\", \"v_proj\"]")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.lr is not None and not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"lr must be a number > 0, got {self.lr!r} (e.g. lr = 1e-3)")


@dataclass
class FedAvgConfig(LoRAConfig):
    # lr sweep 3e-3 / 1e-2 / 3e-2 → final eval loss 2.143 / 1.922 / 8.18 (diverged) (base 3.372): 1e-2
    # (simulations/report.py, SmolLM2-135M, chatterbot by category, 4 clients × 5 rounds × 2 local steps, batch 4;
    # simulations/results/REPORT.md)
    DEFAULT_LR: ClassVar[float] = 1e-2
    uniform: bool = field(default=False, metadata={"help": "weight clients equally instead of by examples"})
