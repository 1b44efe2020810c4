"""The LoRA-SB layer: y = base_layer(x) + sb_B(sb_R(sb_A(x))), i.e. W_eff = W + B·R·A (scale 1).

All three factors are plain `nn.Linear(bias=False)` so opacus computes per-sample gradients of R with its
built-in Linear support. Submodule names matter: `base_layer` makes `target_linears` and the model
fingerprint see the wrapped base weight under its original name; `sb_A`/`sb_R`/`sb_B` are skipped by the
fingerprint as adapter weights.

The factors are float32 master weights on the base's device whatever the base holds (float32, bfloat16,
float16, nf4/int8 bitsandbytes layers): x is cast to float32 for the B·R·A path and its result back to the
base output's dtype before the sum (on a float32 base both casts are no-ops: the exact path is unchanged).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from fedtune.algorithms.common.lora import PEFT_PREFIX

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # {module: (A r×d_in, B d_out×r)}


class SBLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        kw = {"bias": False, "dtype": torch.float32, "device": base.weight.device}
        self.base_layer = base
        # skip_init: no default init, so wrapping consumes no global RNG; attach_sb fills the weights
        self.sb_A = skip_init(nn.Linear, base.in_features, rank, **kw)  # weight: r×d_in, frozen
        self.sb_R = skip_init(nn.Linear, rank, rank, **kw)  # weight: r×r, the only trained tensor
        self.sb_B = skip_init(nn.Linear, rank, base.out_features, **kw)  # weight: d_out×r, frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) → (..., d_out)
        out = self.base_layer(x)
        return out + self.sb_B(self.sb_R(self.sb_A(x.to(torch.float32)))).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B·R·A (d_out×d_in)."""
        return self.sb_B.weight @ self.sb_R.weight @ self.sb_A.weight


def sb_layers(model: nn.Module) -> dict[str, SBLinear]:
    """{module name in the unwrapped base model: SBLinear}."""
    return {n.removeprefix(PEFT_PREFIX): m for n, m in model.named_modules() if isinstance(m, SBLinear)}


@torch.no_grad()
def attach_sb(model: nn.Module, factors: Factors) -> nn.Module:
    """Wrap each named nn.Linear with an SBLinear holding (A, B) and R = 0; idempotent. Returns `model`."""
    for name, (a, b) in sorted(factors.items()):
        mod = model.get_submodule(name)
        if not isinstance(mod, SBLinear):
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"fedsb target {name} is {type(mod).__name__}, not nn.Linear")  # noqa: TRY004
            parent_name, _, child = name.rpartition(".")
            mod = SBLinear(mod, a.shape[0])
            setattr(model.get_submodule(parent_name) if parent_name else model, child, mod)
        base = mod.base_layer
        if a.shape != (a.shape[0], base.in_features) or b.shape != (base.out_features, a.shape[0]):
            raise ValueError(f"fedsb factors for {name} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                             f"expected A r×{base.in_features}, B {base.out_features}×r")
        mod.sb_A.weight.copy_(a)
        mod.sb_B.weight.copy_(b)
        mod.sb_R.weight.zero_()
    freeze_all_but_r(model)
    return model


def freeze_all_but_r(model: nn.Module) -> None:
    """Only the R matrices train; base weights, A and B are frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".sb_R.weight"))


def get_R(model: nn.Module) -> torch.Tensor:
    """A copy of every R, stacked [n_modules, r, r] in sorted module-name order (the order the server derives
    from its own state: the sorted names of the A/B factors it sent in the setup payload), on the CPU."""
    layers = sb_layers(model)
    return torch.stack([layers[n].sb_R.weight.detach() for n in sorted(layers)]).to("cpu")


@torch.no_grad()
def set_R(model: nn.Module, R: torch.Tensor) -> None:
    """Load a packed R [n_modules, r, r] (sorted module-name order, as `get_R`; any device, float)."""
    layers = sb_layers(model)
    shape = (len(layers), *next(iter(layers.values())).sb_R.weight.shape) if layers else (0,)
    if not isinstance(R, torch.Tensor) or tuple(R.shape) != shape or not R.is_floating_point():
        got = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
        got = f"{got} {R.dtype}" if isinstance(R, torch.Tensor) else got
        raise ValueError(f"fedsb packed R has shape {got}; this model has {len(layers)} Fed-SB modules, expected "
                         f"{shape} float (one r×r R per module, sorted by module name)")
    for i, n in enumerate(sorted(layers)):
        layers[n].sb_R.weight.copy_(R[i])
