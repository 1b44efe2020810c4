"""Model fingerprint: sha256 over the base weights (names, dtypes, shapes, bytes), adapters excluded."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

_ADAPTER_MARKERS = ("lora_", "sb_R", "sb_A", "sb_B", "modules_to_save")


def _base_name(name: str) -> str:
    # peft wraps a module as `base_model.model.<orig>` and a LoRA layer's weight as `<orig>.base_layer.weight`
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def fingerprint(model: nn.Module) -> str:
    """Hex sha256 of the frozen base weights; identical across processes for identical weights."""
    items = []
    for name, t in model.state_dict(keep_vars=False).items():
        if any(m in name for m in _ADAPTER_MARKERS):
            continue
        items.append((_base_name(name), t))
    seen: set[int] = set()

    def deduped():
        for name, t in sorted(items, key=lambda x: x[0]):
            if t.data_ptr() in seen and t.numel() > 0:  # tied weights: hash once, keep the name
                yield name, None
                continue
            seen.add(t.data_ptr())
            yield name, t

    return _hash_items(deduped())


def _hash_items(items) -> str:
    """The same digest as `fingerprint` from (name, tensor or None) pairs in sorted-name order, where None
    marks a name that shares storage with an earlier one (tied weights: the name is hashed, not the bytes)."""
    h = hashlib.sha256()
    for name, t in items:
        if t is None:
            h.update(name.encode())
            continue
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_fingerprint(path, config) -> str | None:
    """`fingerprint` of the float32 model stored in HF directory `path`, computed from its safetensors files one
    tensor at a time (upcast to float32, as a float32 load does), without building the model: a client that holds
    the base in bfloat16 or 4-bit gets the same fingerprint as one that holds it in float32. The names and tied
    weights come from the model class built on the meta device. None when the files do not map 1:1 onto the
    model's state dict (the caller then fingerprints a float32 load)."""
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    where: dict[str, Path] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            where.update({k: f for k in s.keys()})  # noqa: SIM118 - safe_open is not a mapping
    if not where:
        return None
    with torch.device("meta"):
        skel = AutoModelForCausalLM.from_config(config)
    skel.tie_weights()
    sd = skel.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in sd.items():
        groups.setdefault(id(t), []).append(name)
    seen: set[int] = set()
    handles: dict[Path, Any] = {}

    def items():
        for name in sorted(sd):
            key = id(sd[name])
            if key in seen and sd[name].numel() > 0:
                yield name, None
                continue
            seen.add(key)
            src = next((n for n in groups[key] if n in where), None)
            if src is None:
                raise KeyError(name)
            f = where[src]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt")
            yield name, handles[f].get_tensor(src).to(torch.float32)

    try:
        return _hash_items(items())
    except KeyError:
        return None
    finally:
        handles.clear()
