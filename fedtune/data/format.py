"""Chat formatting with the loss on response tokens only, and padding collation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.data.loaders import Example

IGNORE = -100  # label value that HF causal LMs skip in the loss


class ChatFormatter:
    """Example → {"input_ids", "labels"}; labels are IGNORE on the prompt (chat template) part."""

    def __init__(self, tokenizer, max_seq_len: int = 128) -> None:
        if max_seq_len < 8:
            raise ValueError(f"max_seq_len must be ≥ 8, got {max_seq_len}")
        self.tok = tokenizer
        self.max_seq_len = max_seq_len
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def _split(self, ex: Example) -> tuple[str, str]:
        if not ex.prompt:  # plain text: no template, loss on all tokens
            return "", ex.response + (self.tok.eos_token or "")
        if not self.has_template:
            return f"User: {ex.prompt}\nAssistant: ", ex.response + (self.tok.eos_token or "")
        user = [{"role": "user", "content": ex.prompt}]
        full = user + [{"role": "assistant", "content": ex.response}]
        head = self.tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        whole = self.tok.apply_chat_template(full, tokenize=False)
        if not whole.startswith(head):  # template that rewrites the prompt: fall back to plain split
            return head, ex.response + (self.tok.eos_token or "")
        return head, whole[len(head):]

    def __call__(self, ex: Example) -> dict[str, list[int]]:
        head, tail = self._split(ex)
        h = self.tok(head, add_special_tokens=False)["input_ids"] if head else []
        t = self.tok(tail, add_special_tokens=False)["input_ids"]
        ids = (h + t)[: self.max_seq_len]
        labels = ([IGNORE] * len(h) + t)[: self.max_seq_len]
        return {"input_ids": ids, "labels": labels}

    def many(self, examples: Sequence[Example]) -> list[dict[str, list[int]]]:
        """Tokenize; drop examples whose response was truncated away entirely."""
        out = [self(ex) for ex in examples]
        return [f for f in out if any(lbl != IGNORE for lbl in f["labels"])]


def collate(features: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch. Shapes: (B, T)."""
    T = max(len(f["input_ids"]) for f in features)
    B = len(features)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
