from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fedtune.algorithms.api import MAX_RANK
from fedtune.algorithms.common.lora import DEFAULT_TARGETS

INIT_MODES = ("sign", "grad")


@dataclass
class FedSBConfig:
    """Fed-SB settings ([fedsb] in a run config). The LoRA scale is fixed to 1 (lora_alpha = rank)."""

    # lr sweep 1e-2 / 3e-2 / 1e-1 / 3e-1 → final eval loss 2.485 / 2.251 / 2.166 / 2.417 (base 3.372): 1e-1; Fed-SB
    # trains only R (r×r), so it wants ~10× the LoRA lr (simulations/report.py workload, simulations/results/REPORT.md)
    DEFAULT_LR: ClassVar[float] = 1e-1

    rank: int = field(default=8, metadata={"help": "r: A r×d_in, R r×r, B d_out×r (upload r² per module)"})
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS),
                                      metadata={"help": "names (last part) of the nn.Linear modules to adapt"})
    init_batches: int = field(default=4, metadata={"help": "batches of init data whose ∇W is summed"})
    init_batch_size: int = field(default=8, metadata={"help": "batch size for the init gradients"})
    init_seed: int | None = field(default=None, metadata={"help": "init seed (batches, SVD); None = run seed"})
    init_mode: str = field(default="sign", metadata={"help": "\"sign\": SVD of −sign(Σ∇W) (reference); \"grad\": of −Σ∇W"})
    svd_niter: int = field(default=10, metadata={"help": "power iterations of torch.svd_lowrank"})
    uniform: bool = field(default=False, metadata={"help": "weight clients equally instead of by examples"})
    lr: float | None = field(default=None, metadata={"help": "local AdamW lr of R; None = [train] lr, else DEFAULT_LR"})

    def __post_init__(self) -> None:
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or self.lr <= 0):
            raise ValueError(f"fedsb lr must be a number > 0, got {self.lr!r} (e.g. lr = 1e-2)")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 < self.rank <= MAX_RANK:
            raise ValueError(f"fedsb rank must be a positive integer, got {self.rank!r} (at most {MAX_RANK}; e.g. rank = 8)")
        if isinstance(self.target_modules, str):
            raise ValueError(  # noqa: TRY004 (config errors are ValueErrors throughout, as in LoRAConfig)
                f"fedsb target_modules must be a list, got the string {self.target_modules!r}; "
                f"e.g. target_modules = [\"q_proj\", \"v_proj\"]")
        if not self.target_modules:
            raise ValueError("fedsb target_modules is empty; e.g. target_modules = [\"q_proj\", \"v_proj\"]")
        bad = [t for t in self.target_modules if not isinstance(t, str) or not t or "." in t]
        if bad:
            raise ValueError(f"fedsb target_modules must be module name suffixes such as \"q_proj\", got {bad}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"fedsb target_modules has duplicates: {self.target_modules}")
        for name in ("init_batches", "init_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"fedsb {name} must be a positive integer, got {v!r}")
        if self.init_seed is not None and (isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int)):
            raise ValueError(f"fedsb init_seed must be an integer or None (= run seed), got {self.init_seed!r}")
        if self.init_mode not in INIT_MODES:
            raise ValueError(f"fedsb init_mode must be one of {list(INIT_MODES)}, got {self.init_mode!r}")
        if isinstance(self.svd_niter, bool) or not isinstance(self.svd_niter, int) or self.svd_niter < 0:
            raise ValueError(f"fedsb svd_niter must be an integer ≥ 0, got {self.svd_niter!r}")
