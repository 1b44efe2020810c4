"""Export the global model: a standard peft LoRA adapter (no fedtune needed at inference), or the
merged full model. Every method hands its adapter as {module: (A (r×d_in), B (d_out×r))} with the scale
folded into B, so the adapter is written with lora_alpha = r (scale 1)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedtune.algorithms.common.lora import PEFT_PREFIX
from fedtune.fileio import publish, save_safetensors
from fedtune.models import ModelError, hf_dir


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


def export_adapter(gm, out_dir: Path, *, base_name: str, seed: int, base_fingerprint: str) -> Path | None:
    """The global adapter. adapter_config.json names the base as a directory a plain peft user can load
    (the HF dir, or the dequantised SmolLM2/GGUF cache); a model that exists only in memory ("tiny") keeps
    its name until `fedtune export-base DIR --adapter <this dir>` writes it and points the adapter there."""
    factors = gm.client.export_factors(gm.model)
    if not factors:
        return None
    base = hf_dir(base_name)
    path = write_peft_adapter(out_dir, factors, base_name=str(base) if base else base_name)
    info = {"global_version": gm.version, "base_model": base_name, "seed": seed,
            "base_model_fingerprint": base_fingerprint, "export": gm.client.export_info}
    (out_dir / "fedtune.json").write_text(json.dumps(info, indent=1))
    return publish(path)


def export_base(model, tokenizer, out_dir: Path, *, info: dict, force: bool = False) -> Path:
    """The base model as a Hugging Face directory (config, safetensors, tokenizer) + fedtune-base.json. An earlier
    export in `out_dir` is replaced only with `force`."""
    out_dir = Path(out_dir)
    if (out_dir / "fedtune-base.json").exists() and not force:
        raise ModelError(f"{out_dir} already holds an exported base model; pass --force to replace it")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "fedtune-base.json").exists():
        raise ModelError(f"{out_dir} is not empty and holds no fedtune-base.json; choose a new directory")
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "fedtune-base.json").write_text(json.dumps(info, indent=1))
    return publish(out_dir)


def point_adapter(adapter_dir: Path, base_dir: Path) -> Path:
    """Set the adapter's base_model_name_or_path to `base_dir` (absolute)."""
    p = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["base_model_name_or_path"] = str(Path(base_dir).resolve())
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return publish(p)


def export_merged(gm, tokenizer, out_dir: Path) -> Path:
    """The full model with the global adapter merged in (destroys the adapter wrapping: call last)."""
    model = gm.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return publish(out_dir)
