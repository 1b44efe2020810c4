from __future__ import annotations

from dataclasses import dataclass, field

from fedtune.algorithms.api import MAX_RANK
from fedtune.algorithms.common.lora import DEFAULT_TARGETS

# η by trainable mode (see the package docstring). "lora": from the sweep 1e-3 / 3e-3 / 1e-2 → final eval loss
# 3.358 / 3.327 / 4.548 (diverged) on the report workload (simulations/results/REPORT.md); "full" is not swept.
DEFAULT_LR = {"full": 1e-6, "lora": 3e-3}
_BITS = {"nf4": "4-bit", "int8": "8-bit"}


def hardware_problem(trainable: str, quantization: str) -> str | None:
    """Why FedKSeed cannot run `trainable` on a base held with `quantization`, and what to use (one line), or
    None. Full-parameter ZO perturbs and updates the base's weights in place; a quantized base's weights are
    frozen codes. Any dtype is fine otherwise: a bf16/fp16 base gets float32 master weights (zo docstring)."""
    if trainable != "full" or quantization == "none":
        return None
    bits = _BITS.get(quantization, "quantized")
    return (f'fedkseed trainable = "full" cannot train a {bits} base (quantization = "{quantization}"): its weights '
            "are frozen quantized codes, which can hold neither a perturbation of ε·z nor an update of η·g·z; use "
            'dtype = "bfloat16" with quantization = "none" (FedKSeed keeps float32 master weights and computes in '
            f'bfloat16), or trainable = "lora" (float32 LoRA factors on the {quantization} base), or a first-order '
            f"method on {quantization} (fedavg, fedsb or flora)")


@dataclass
class FedKSeedConfig:
    """[fedkseed] settings. Defaults follow the paper except η, which is sized for ~135M models."""

    num_seeds: int = field(default=4096, metadata={"help": "K: size of the candidate seed set"})
    eps: float = field(default=5e-4, metadata={"help": "ε: perturbation scale of the SPSA estimate"})
    lr: float | None = field(
        default=None,
        metadata={"help": "η: ZO learning rate; None = 1e-6 for full, 3e-3 for lora. Overrides the run's lr"},
    )
    trainable: str = field(default="full", metadata={"help": '"full" (all weights) or "lora" (A/B only)'})
    rank: int = field(default=8, metadata={"help": 'LoRA rank when trainable = "lora"'})
    alpha: float = field(default=16.0, metadata={"help": 'LoRA alpha when trainable = "lora"'})
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS),
                                      metadata={"help": 'LoRA target modules when trainable = "lora"'})
    seed_sampling: str = field(default="uniform", metadata={"help": '"uniform" or "pro" (by past |g|)'})
    grad_clip: float = field(default=100.0, metadata={"help": "clamp each step's scalar g to ±grad_clip; 0 = off"})
    pro_clip: float = field(default=1000.0, metadata={"help": '|g| clip inside the "pro" statistics'})
    uniform: bool = field(default=False, metadata={"help": "weight clients equally instead of by examples"})

    def __post_init__(self) -> None:
        if not isinstance(self.num_seeds, int) or not 1 <= self.num_seeds <= 2**31 - 1:
            raise ValueError(
                f"fedkseed num_seeds must be an integer in [1, 2^31), got {self.num_seeds!r} (paper: 4096)"
            )
        if not self.eps > 0:
            raise ValueError(f"fedkseed eps must be > 0, got {self.eps!r} (paper: 5e-4)")
        if self.trainable not in DEFAULT_LR:
            raise ValueError(f'fedkseed trainable must be "full" or "lora", got {self.trainable!r}')
        if self.lr is None:
            self.lr = DEFAULT_LR[self.trainable]
        if not self.lr > 0:
            raise ValueError(f"fedkseed lr must be > 0, got {self.lr!r} (e.g. 1e-6 for a 135M model, full)")
        if self.seed_sampling not in ("uniform", "pro"):
            raise ValueError(f'fedkseed seed_sampling must be "uniform" or "pro", got {self.seed_sampling!r}')
        if self.grad_clip < 0 or not self.pro_clip > 0:
            raise ValueError(
                f"fedkseed grad_clip must be ≥ 0 and pro_clip > 0, got {self.grad_clip!r}, {self.pro_clip!r}"
            )
        if self.trainable == "lora":
            if not isinstance(self.rank, int) or not 0 < self.rank <= MAX_RANK:
                raise ValueError(f"fedkseed rank must be a positive integer, got {self.rank!r} (at most {MAX_RANK}; e.g. rank = 8)")
            if not self.alpha > 0:
                raise ValueError(f"fedkseed alpha must be > 0, got {self.alpha!r} (e.g. alpha = 2 * rank)")
            if not self.target_modules:
                raise ValueError('fedkseed target_modules is empty; e.g. target_modules = ["q_proj", "v_proj"]')
