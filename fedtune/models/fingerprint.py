"""Model fingerprint: sha256 over the base weights (names, dtypes, shapes, bytes), adapters excluded."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

_ADAPTER_MARKERS = ("lora_", "sb_R", "sb_A", "sb_B", "modules_to_save")


def _base_name(name: str) -> str:
    # peft wraps a module as `base_model.model.<orig>` and a LoRA layer's weight as `<orig>.base_layer.weight`
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def fingerprint(model: nn.Module) -> str:
    """Hex sha256 of the frozen base weights; identical across processes for identical weights."""
    h = hashlib.sha256()
    seen: set[int] = set()
    items = []
    for name, t in model.state_dict(keep_vars=False).items():
        if any(m in name for m in _ADAPTER_MARKERS):
            continue
        items.append((_base_name(name), t))
    for name, t in sorted(items, key=lambda x: x[0]):
        if t.data_ptr() in seen and t.numel() > 0:  # tied weights: hash once, keep the name
            h.update(name.encode())
            continue
        seen.add(t.data_ptr())
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
