"""Where and how a client holds its base model: device, dtype, quantization, gradient checkpointing.

Each organisation picks its own (`[model] device / dtype / quantization`, `[train] gradient_checkpointing`, or
the same flags on every command); none of it travels, none of it changes the base fingerprint (which identifies
the weights, see fedtune.models.loading.Base), and adapters always keep float32 master weights, so what is
uploaded and aggregated is the same kind of tensor whatever the hardware.

The settings are declared once, in fedtune.models.settings.SETTINGS; the CLI flags, the config fields and their
checks, the Flower node keys, the keys a client reports at Join, the resume rules and the configuration reference
are made from it.

  device        "auto" (cuda when torch sees a GPU, else cpu) | "cpu" | "cuda" | "cuda:N"
  dtype         "auto" | "float32" | "bfloat16" | "float16"; auto: bfloat16 on a GPU that supports it, and for
                a quantized base (its compute dtype); float32 otherwise (CPU: exact, the tested default)
  quantization  "none" | "nf4" (4-bit NormalFloat, double quantization: QLoRA) | "int8" (LLM.int8()),
                through bitsandbytes and transformers' BitsAndBytesConfig; compute dtype = dtype
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedtune.models.settings import DTYPE_NAMES, QUANTIZATIONS

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


class HardwareError(ValueError):
    """A device/dtype/quantization choice this machine or this method cannot run (one line, says what to use)."""


def check_choice(device: str, dtype: str, quantization: str) -> None:
    """HardwareError unless the three settings are spelled as documented (no torch/CUDA query)."""
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or
                                           (device.startswith("cuda:") and device[5:].isdigit())):
        raise HardwareError(f"model.device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got {device!r}")
    if dtype not in ("auto", *DTYPES):
        raise HardwareError(f"model.dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    if quantization not in QUANTIZATIONS:
        raise HardwareError(f"model.quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    if quantization != "none" and dtype == "float16" and device == "cpu":
        raise HardwareError("a quantized base on the CPU computes in bfloat16 or float32, not float16")


def resolve_device(spec: str) -> torch.device:
    check_choice(spec, "auto", "none")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HardwareError(f"model.device = {spec!r} but torch sees no CUDA GPU (torch {torch.__version__}, "
                                f"CUDA build: {torch.version.cuda or 'no'}); use \"cpu\" or \"auto\", or install a "
                                "CUDA build of torch (docs/hardware.md)")
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise HardwareError(f"model.device = {spec!r} but torch sees {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    return torch.device("cpu")


def resolve_dtype(spec: str, device: torch.device, quantization: str = "none") -> torch.dtype:
    check_choice("auto", spec, quantization)
    if spec != "auto":
        return DTYPES[spec]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if quantization != "none" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Placement:
    """How a loaded base model is held (what `load_model` resolved "auto" to)."""

    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable
    dtype: torch.dtype = torch.float32
    quantization: str = "none"

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto", quantization: str = "none") -> Placement:
        check_choice(device, dtype, quantization)
        dev = resolve_device(device)
        return cls(dev, resolve_dtype(dtype, dev, quantization), quantization)

    @property
    def exact(self) -> bool:
        """float32 weights that can be written in place (FLoRA merges ΔW into them; FedKSeed perturbs them)."""
        return self.dtype == torch.float32 and self.quantization == "none"

    @property
    def plain(self) -> bool:
        """float32 on the CPU, unquantized: how fedtune held every model before these settings existed."""
        return self.exact and self.device.type == "cpu"

    def describe(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": dtype_name(self.dtype), "quantization": self.quantization}


def placement(model: nn.Module) -> Placement:
    """How `model` holds its base, read off the model (for a model built or loaded by hand; a loaded base comes with
    its Placement, fedtune.models.loading.Base): bitsandbytes' 4-bit / 8-bit layers and their compute dtype, else
    the device and dtype of its first linear layer's weight (its first parameter's when it has none)."""
    base = getattr(model, "get_base_model", lambda: model)()
    for mod in base.modules():
        kind = type(mod).__name__
        if kind == "Linear4bit":
            return Placement(mod.weight.device, getattr(mod, "compute_dtype", None) or torch.float32, "nf4")
        if kind == "Linear8bitLt":
            return Placement(mod.weight.device, base.dtype if base.dtype in DTYPES.values() else torch.float32, "int8")
    w = next((m.weight for m in base.modules() if isinstance(m, nn.Linear)), None)
    w = next(base.parameters()) if w is None else w
    return Placement(w.device, w.dtype if w.is_floating_point() else torch.float32, "none")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device` (the same dict, untouched, when it is there already: CPU runs copy nothing)."""
    if all(t.device == device for t in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for "nf4" / "int8" (None for "none"); a clear error without bitsandbytes."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise HardwareError(f"model.quantization = {quantization!r} needs bitsandbytes: pip install "
                            "'bitsandbytes>=0.46' (CPU and CUDA builds on PyPI)") from None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)
    return BitsAndBytesConfig(load_in_8bit=True)


def prepare_for_training(model: nn.Module, *, gradient_checkpointing: bool, holding: Placement | None = None,
                         ) -> nn.Module:
    """Once, before adapters are attached: freeze the base, and for a quantized base peft's k-bit preparation
    (norms and the embedding/head upcast to float32, as QLoRA and FlowerTune do); gradient checkpointing
    (non-reentrant: recomputes each decoder layer in the backward instead of keeping its activations; only
    active in train mode, so evaluation and zeroth-order forwards are unchanged). `holding`: how the model is held
    (default: read off it)."""
    pl = holding or placement(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if pl.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise HardwareError(f"{type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def gradient_checkpointing_on(model: nn.Module) -> bool:
    base = getattr(model, "get_base_model", lambda: model)()
    if hasattr(base, "is_activation_checkpointing"):  # transformers ≥ 5 (is_gradient_checkpointing: a FutureWarning)
        return bool(base.is_activation_checkpointing)
    return bool(getattr(base, "is_gradient_checkpointing", False))


def hardware_metrics(model: nn.Module, holding: Placement | None = None) -> dict[str, Any]:
    """How a client trains, one entry per setting of SETTINGS (under its name): the holding's strings (`holding`,
    else read off the model) and whether gradient checkpointing is on."""
    return {**(holding or placement(model)).describe(), "gradient_checkpointing": gradient_checkpointing_on(model)}


def describe_hardware(model: nn.Module, holding: Placement | None = None) -> str:
    """One log line: "cpu, float32, quantization none, gradient checkpointing off"."""
    h = hardware_metrics(model, holding)
    return (f"{h['device']}, {h['dtype']}, quantization {h['quantization']}, gradient checkpointing "
            f"{'on' if h['gradient_checkpointing'] else 'off'}")
