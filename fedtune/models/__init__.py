"""Base models: tiny random test models, the offline SmolLM2 default, HF directories and GGUF files (loading.py);
their fingerprint; how a client holds them (hardware.py) and the hardware settings table (settings.py, importable
without torch: the CLI builds its flags from it). The names below are imported on first use."""

from __future__ import annotations

import importlib

_WHERE = {"Base": "loading", "ModelError": "loading", "hf_dir": "loading", "load_base": "loading",
          "load_model": "loading", "smollm2_gguf": "loading", "fingerprint": "fingerprints", "tiny_llama": "tiny",
          "tiny_tokenizer": "tiny"}
__all__ = sorted(_WHERE)  # noqa: PLE0605 - the lazily imported names above


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"fedtune.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fedtune.models' has no attribute {name!r}")
