"""Export the global model: a standard peft LoRA adapter (no fedtune needed at inference), or the
merged full model. Every method hands its adapter as {module: (A (r×d_in), B (d_out×r))} with the scale
folded into B, so the adapter is written with lora_alpha = r (scale 1)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedtune.algorithms.lora_common import PEFT_PREFIX
from fedtune.fileio import publish, save_safetensors


def write_peft_adapter(out_dir: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, base_name: str) -> Path:
    """adapter_config.json + adapter_model.safetensors loadable by PeftModel.from_pretrained(base, out_dir)."""
    from peft import LoraConfig

    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    r = max(ranks.values())
    other = {name: k for name, k in sorted(ranks.items()) if k != r}  # e.g. FLoRA: rank ≤ min(d_in, d_out)
    targets = sorted({name.rsplit(".", 1)[-1] for name in factors})
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0, bias="none",
                     rank_pattern=other, alpha_pattern=dict(other),
                     base_model_name_or_path=base_name, task_type="CAUSAL_LM")
    cfg.save_pretrained(str(out_dir))
    tensors = {}
    for name, (a, b) in sorted(factors.items()):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().float().contiguous()
    save_safetensors(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    return publish(out_dir)


def export_adapter(gm, out_dir: Path, *, base_name: str) -> Path | None:
    factors = gm.client.export_factors(gm.model)
    if not factors:
        return None
    path = write_peft_adapter(out_dir, factors, base_name=base_name)
    (out_dir / "fedtune.json").write_text(json.dumps({"global_version": gm.version}))
    return publish(path)


def export_merged(gm, tokenizer, out_dir: Path) -> Path:
    """The full model with the global adapter merged in (destroys the adapter wrapping: call last)."""
    model = gm.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return publish(out_dir)
