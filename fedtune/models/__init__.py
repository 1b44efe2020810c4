"""Base models: tiny random test models, the offline SmolLM2 default, HF directories and GGUF files."""

from fedtune.models.fingerprint import fingerprint
from fedtune.models.loading import ModelError, hf_dir, load_model, smollm2_gguf
from fedtune.models.tiny import tiny_llama, tiny_tokenizer

__all__ = ["ModelError", "fingerprint", "hf_dir", "load_model", "smollm2_gguf", "tiny_llama", "tiny_tokenizer"]
