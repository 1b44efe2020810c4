"""LoRA plumbing shared by LoRA-based methods: target discovery, peft attach, state in/out.

Update/state tensors are keyed "<module>.A" (r×d_in) and "<module>.B" (d_out×r), where <module> is the
module's name in the unwrapped base model. A and B are told apart by name, never by shape.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedtune.algorithms.api import MAX_RANK, TensorDict, TensorSpec, UpdateSpec, adam_radius

PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ["q_proj", "v_proj"]


@dataclass
class LoRAConfig:
    """LoRA settings shared by LoRA-based methods ([lora] in a run config applies to every method whose config
    subclasses this; the method's own section overrides it)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r (> 0)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scale s = alpha / r"})
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS),
                                      metadata={"help": "names (last part) of the nn.Linear modules to adapt"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout on the adapter input"})
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


def target_linears(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear]:
    """{name: nn.Linear} of the base model's modules whose last name part is in `targets`."""
    out = {}
    for name, mod in model.named_modules():
        name = name.removeprefix(PEFT_PREFIX)
        if ".lora_" in name or name.endswith(".base_layer"):
            continue
        if name.rsplit(".", 1)[-1] in targets:
            base = getattr(mod, "base_layer", mod)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"target module {name} is {type(base).__name__}, not nn.Linear")
            out[name] = base
    if not out:
        raise ValueError(f"none of the target modules {list(targets)} exist in the model; check [lora] target_modules")
    return out


def lora_shapes(model: nn.Module, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{module: (d_out, d_in)}."""
    return {n: (m.out_features, m.in_features) for n, m in target_linears(model, targets).items()}


def init_lora_factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> TensorDict:
    """peft's default init: A ~ kaiming_uniform(a=√5) (r×d_in), B = 0 (d_out×r); seeded, in module order."""
    g = torch.Generator().manual_seed(seed)
    out: TensorDict = {}
    for name in sorted(shapes):
        d_out, d_in = shapes[name]
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform with a=√5 on (r, d_in) gives U(-1/√d_in, 1/√d_in)
        out[f"{name}.A"] = (torch.rand(rank, d_in, generator=g) * 2 - 1) * bound
        out[f"{name}.B"] = torch.zeros(d_out, rank)
    return out


def attach_lora(model: nn.Module, *, adapter: str, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0):
    """Wrap `model` with a peft LoRA adapter (or add one to an existing PeftModel); returns the PeftModel."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, bias="none")
    if isinstance(model, PeftModel):
        if adapter not in model.peft_config:
            model.add_adapter(adapter, cfg)
            _float32_adapter(model, adapter)
        return model
    model = get_peft_model(model, cfg, adapter_name=adapter)
    _float32_adapter(model, adapter)
    return model


def _float32_adapter(model: nn.Module, adapter: str) -> None:
    """LoRA factors are float32 master weights on any base (bf16, fp16, 4-bit); peft's autocast_adapter_dtype
    does this for get_peft_model but not for add_adapter."""
    for layer in lora_layers(model, adapter).values():
        for mod in (layer.lora_A[adapter], layer.lora_B[adapter]):
            if mod.weight.dtype != torch.float32:
                mod.to(torch.float32)


def lora_layers(model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    """{module: peft LoraLayer} holding `adapter`."""
    from peft.tuners.lora import LoraLayer

    return {
        n.removeprefix(PEFT_PREFIX): m
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and adapter in m.lora_A
    }


def get_lora_state(model: nn.Module, adapter: str, *, fold_scale: bool = False) -> TensorDict:
    """Copy of the adapter's factors, on the CPU (float32 master weights whatever the base's dtype or device);
    with fold_scale the LoRA scale s = α/r is multiplied into B."""
    out: TensorDict = {}
    for name, layer in lora_layers(model, adapter).items():
        s = layer.scaling[adapter] if fold_scale else 1.0
        out[f"{name}.A"] = layer.lora_A[adapter].weight.detach().to("cpu", copy=True)
        out[f"{name}.B"] = layer.lora_B[adapter].weight.detach().to("cpu", copy=True) * s
    return out


@torch.no_grad()
def set_lora_state(model: nn.Module, adapter: str, tensors: TensorDict) -> None:
    layers = lora_layers(model, adapter)
    expected = {f"{n}.{ab}" for n in layers for ab in "AB"}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise ValueError(f"adapter tensors do not match the model (missing {missing}, unexpected {extra})")
    for name, layer in layers.items():  # copy_ would broadcast a (1, d_in) A over every row: shapes must match
        for ab, w in (("A", layer.lora_A[adapter].weight), ("B", layer.lora_B[adapter].weight)):
            t = tensors[f"{name}.{ab}"]
            if tuple(t.shape) != tuple(w.shape) or not t.is_floating_point():
                raise ValueError(f"adapter tensor {name}.{ab} is {t.dtype} {tuple(t.shape)}, this model's is "
                                 f"{w.dtype} {tuple(w.shape)}")
    for name, layer in layers.items():
        layer.lora_A[adapter].weight.copy_(tensors[f"{name}.A"])
        layer.lora_B[adapter].weight.copy_(tensors[f"{name}.B"])


def activate(model: nn.Module, adapter: str) -> None:
    """Make `adapter` the active one; only its A/B train, the base and other adapters are frozen."""
    model.base_model.set_adapter(adapter)
    for name, p in model.named_parameters():
        p.requires_grad_(f".{adapter}." in name and ".lora_" in name)


def fork_model(model: nn.Module, owned: Callable[[str], bool] = lambda name: ".lora_" in name) -> nn.Module:
    """A copy of `model`'s module tree whose parameters and buffers are the model's own tensor objects (shared,
    no copy) except those whose name satisfies `owned` (copied: e.g. every LoRA factor, active or not). Only
    the owned tensors cost memory; the fork's modules have their own train/eval flags and adapter lists, so a
    thread can train its fork while another thread trains another one on the same frozen base."""
    shared = {id(t): t for n, t in [*model.named_parameters(remove_duplicate=False),
                                    *model.named_buffers(remove_duplicate=False)] if not owned(n)}
    return copy.deepcopy(model, memo=shared)


def adapter_factors(model: nn.Module, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter as {module: (A (r×d_in), s·B (d_out×r))}: what ClientAlgorithm.export_factors hands out."""
    st = get_lora_state(model, adapter, fold_scale=True)
    return {k[:-2]: (st[f"{k[:-2]}.A"], st[f"{k[:-2]}.B"]) for k in st if k.endswith(".A")}


def lora_update_spec(modules: dict[str, Sequence[int]], rank: int, dtype: torch.dtype = torch.float32,
                     train: dict | None = None, scale: float = 1.0) -> UpdateSpec:
    """A fresh LoRA trained from peft's init: "<m>.A" (r×d_in) and "<m>.B" (d_out×r, sent as scale·B) for every module
    {m: (d_out, d_in)}; with `train` (steps, lr), each value within what that training can reach from the init:
    |A| ≤ 1/√d_in + adam_radius, |B| ≤ scale·adam_radius (B starts at 0)."""
    out = {}
    for m, (d_out, d_in) in modules.items():
        a0 = 1.0 / math.sqrt(int(d_in))  # init_lora_factors: A ~ U(−1/√d_in, 1/√d_in)
        ra, rb = (a0 + adam_radius(train, a0), abs(scale) * adam_radius(train, 0.0)) if train else (math.inf,) * 2
        out[f"{m}.A"] = TensorSpec((rank, int(d_in)), dtype, radius=ra)
        out[f"{m}.B"] = TensorSpec((int(d_out), rank), dtype, radius=rb)
    return UpdateSpec(out)
