"""Tiny random Llama + a byte-level BPE tokenizer trained in memory: seconds, no files.

Both are deterministic (fixed training text and seed), so every process that builds them gets the same
weights and the same model fingerprint.
"""

from __future__ import annotations

import functools

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fedtune.data.loaders import load_chatterbot

    texts = [t for ex in load_chatterbot("english") for t in (ex.prompt, ex.response)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512):
    """A PreTrainedTokenizerFast with a ChatML template (same format as SmolLM2)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<pad>", unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    return tok


def tiny_llama(vocab_size: int, *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4):
    """A randomly initialised Llama-style causal LM (fp32). Same seed → bit-identical weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    cfg._name_or_path = "fedtune-tiny-llama"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()
