"""Chat formatting with the loss on assistant tokens only, truncation that keeps the response, and collation.

An example is rendered with the model's own chat template (no template: "User: …\\nAssistant: …<eos>"). Labels
are IGNORE everywhere except the assistant turns (for {"text"} examples: every token).

Truncation to max_seq_len L never drops an example whose template fits:
  1. whole if it fits;
  2. multi-turn: drop the oldest exchanges (system turns stay) until it fits;
  3. cut the last user turn's content from the LEFT and re-render the template (template tokens are never cut),
     keeping at least its last min(len, L/4) tokens;
  4. only if the response alone does not fit beside that: cut the response from the RIGHT.
Dropped only when the template (+ system turns) alone is ≥ L. {"text"} examples are cut from the right.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedtune.data.loaders import Example

IGNORE = -100  # label value that HF causal LMs skip in the loss
BLOCK = 1024  # examples prefetched together: one batched tokenizer call per block; bounds the memo's memory
OUTCOMES = ("whole", "truncated_prompt", "truncated_response", "dropped")


@dataclass
class Formatted:
    feature: dict[str, list[int]] | None  # None when dropped
    outcome: str  # one of OUTCOMES
    length: int  # untruncated token length
    reason: str = ""  # why it was dropped


class ChatFormatter:
    """Example → {"input_ids", "labels"}; labels are IGNORE outside the assistant turns."""

    def __init__(self, tokenizer, max_seq_len: int = 128) -> None:
        if max_seq_len < 8:
            raise ValueError(f"max_seq_len must be ≥ 8, got {max_seq_len}")
        self.tok = tokenizer
        self.max_seq_len = max_seq_len
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token or ""
        self._renders: dict | None = None  # memos, filled by prefetched() for one block of examples
        self._tokens: dict[str, list[int]] | None = None

    @contextmanager
    def prefetched(self, examples: Sequence[Example], *, lengths: bool = False) -> Iterator[None]:
        """Within the block, format() (and needed_len() if `lengths`) of `examples` find the renders and token ids
        they need already made: each conversation rendered once, all texts tokenized in one batched call (the
        tokenizer's batched path encodes each text exactly as a call per text does; test_data_format checks it).
        A text the truncation steps make later is tokenized on demand, as before."""
        self._renders, self._tokens = {}, {}
        try:
            texts: list[str] = []
            for ex in examples:
                if not ex.messages and not ex.prompt:
                    texts.append(ex.response + self.eos)
                    continue
                msgs = self.conversation(ex)
                texts += [t for t, _ in self._segment_texts(msgs)]
                if lengths:
                    minimal, last_user = self._minimal(msgs)
                    texts += [t for t, _ in self._segment_texts(minimal)] + [last_user]
            todo = [t for t in dict.fromkeys(texts) if t]
            if todo:
                self._tokens.update(zip(todo, self._encode_many(todo), strict=True))
            yield
        finally:
            self._renders = self._tokens = None

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added): the tokenizer's batched call, or, for a fast tokenizer
        whose backend has no padding, truncation or special-token splitting set (where that call runs exactly
        backend.encode_batch and reads .ids), the backend call itself: skips a Python conversion per text."""
        be = getattr(self.tok, "_tokenizer", None) if getattr(self.tok, "is_fast", False) else None
        if (be is not None and be.padding is None and be.truncation is None
                and not getattr(be, "encode_special_tokens", True) and not getattr(self.tok, "split_special_tokens", True)):
            return [e.ids for e in be.encode_batch(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    # -- rendering ---------------------------------------------------------------------------------
    def _render(self, msgs: Sequence[tuple[str, str]], gen: bool) -> str:
        if self._renders is not None:
            key = (tuple(msgs), gen)
            if (text := self._renders.get(key)) is None:
                text = self._renders[key] = self._render_now(msgs, gen)
            return text
        return self._render_now(msgs, gen)

    def _render_now(self, msgs: Sequence[tuple[str, str]], gen: bool) -> str:
        if self.has_template:
            return self.tok.apply_chat_template([{"role": r, "content": c} for r, c in msgs], tokenize=False,
                                                add_generation_prompt=gen)
        text = "\n".join(f"{r.capitalize()}: {c}" + (self.eos if r == "assistant" else "") for r, c in msgs)
        return text + (("\n" if msgs else "") + "Assistant: " if gen else "")

    def _ids(self, text: str) -> list[int]:
        if not text:
            return []
        if self._tokens is not None and (ids := self._tokens.get(text)) is not None:
            return list(ids)  # a copy: features may be cut in place
        return self._encode_many([text])[0]

    def _segments(self, msgs: Sequence[tuple[str, str]]) -> list[tuple[list[int], bool]]:
        """Token segments (ids, is_assistant)."""
        return [(self._ids(t), lab) for t, lab in self._segment_texts(msgs)]

    def _segment_texts(self, msgs: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
        """Text segments (text, is_assistant). A template that rewrites earlier turns (not prefix-stable)
        falls back to loss on the last assistant turn only."""
        segs: list[tuple[str, bool]] = []
        prev = ""
        for i, (role, _) in enumerate(msgs):
            if role != "assistant":
                continue
            head, full = self._render(msgs[:i], True), self._render(msgs[: i + 1], False)
            if not head.startswith(prev) or not full.startswith(head):
                head = self._render(msgs[:-1], True)
                segs = [(head, False), (msgs[-1][1] + self.eos, True)]
                break
            segs += [(head[len(prev):], False), (full[len(head):], True)]
            prev = full
        return segs

    @staticmethod
    def _feature(segs: list[tuple[list[int], bool]]) -> dict[str, list[int]]:
        ids = [t for s, _ in segs for t in s]
        labels = [t if lab else IGNORE for s, lab in segs for t in s]
        return {"input_ids": ids, "labels": labels}

    @staticmethod
    def conversation(ex: Example) -> list[tuple[str, str]]:
        return list(ex.messages) if ex.messages else [("user", ex.prompt), ("assistant", ex.response)]

    # -- truncation --------------------------------------------------------------------------------
    def format(self, ex: Example) -> Formatted:
        L = self.max_seq_len
        if not ex.messages and not ex.prompt:  # plain text: loss on every token, cut from the right
            ids = self._ids(ex.response + self.eos)
            return Formatted({"input_ids": ids[:L], "labels": ids[:L]}, "whole" if len(ids) <= L else
                             "truncated_response", len(ids))
        msgs = self.conversation(ex)
        segs = self._segments(msgs)
        n_full = sum(len(s) for s, _ in segs)
        if n_full <= L:
            return Formatted(self._feature(segs), "whole", n_full)
        n_sys = next((i for i, (r, _) in enumerate(msgs) if r != "system"), len(msgs))
        users = [i for i, (r, _) in enumerate(msgs) if r == "user" and i > n_sys]
        for j in users:  # drop the oldest exchanges
            segs = self._segments(msgs[:n_sys] + msgs[j:])
            if sum(len(s) for s, _ in segs) <= L:
                return Formatted(self._feature(segs), "truncated_prompt", n_full)
        last = users[-1] if users else n_sys
        head = msgs[:n_sys] + ([msgs[last]] if last < len(msgs) - 1 and msgs[last][0] == "user" else [])
        has_user = len(head) > n_sys
        answer = msgs[-1]
        u = self._ids(head[-1][1]) if has_user else []

        def build(k: int) -> list[tuple[list[int], bool]]:
            text = self.tok.decode(u[len(u) - k:]) if k > 0 else ""
            return self._segments(head[:-1] + [("user", text)] + [answer] if has_user else head + [answer])

        empty = build(0)
        fixed = sum(len(s) for s, _ in empty)
        prefix = sum(len(s) for s, lab in empty[:-1])
        if prefix >= L:
            return Formatted(None, "dropped", n_full,
                             f"the chat template and system turns alone take {prefix} tokens ≥ max_seq_len")
        reserve = min(len(u), L // 4)
        k = min(len(u), L - fixed)
        if k >= reserve:  # the prompt gives way; the response stays whole
            while k >= 0:
                segs = build(k)
                over = sum(len(s) for s, _ in segs) - L
                if over <= 0:
                    return Formatted(self._feature(segs), "truncated_prompt", n_full)
                k -= over
        # the response alone does not fit beside the kept prompt: cut it from the right
        k = reserve
        while True:
            segs = build(k)
            prefix = sum(len(s) for s, _ in segs[:-1])
            if prefix < L or k == 0:
                break
            k = max(0, k - (prefix - L + 1))
        ids, lab = segs[-1]
        segs[-1] = (ids[: L - prefix], lab)
        return Formatted(self._feature(segs), "truncated_response", n_full)

    def needed_len(self, ex: Example) -> tuple[int, int]:
        """(untruncated length, smallest max_seq_len that keeps this example's response whole)."""
        if not ex.messages and not ex.prompt:
            n = len(self._ids(ex.response + self.eos))
            return n, n
        msgs = self.conversation(ex)
        n_full = sum(len(s) for s, _ in self._segments(msgs))
        minimal, last_user = self._minimal(msgs)
        r = sum(len(s) for s, _ in self._segments(minimal))  # template + system + response
        p = len(self._ids(last_user))
        return n_full, min(n_full, r + p, (4 * (r - 1)) // 3 + 1)  # smallest L with L - L // 4 ≥ r

    @staticmethod
    def _minimal(msgs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str]:
        """(system turns + an empty user turn + the answer, the last user turn's content): what needed_len measures."""
        last_user = next((c for r, c in reversed(msgs[:-1]) if r == "user"), "")
        systems = [m for m in msgs if m[0] == "system"]
        minimal = systems + [("user", "")] + [msgs[-1]] if last_user or not systems else systems + [msgs[-1]]
        return minimal, last_user

    def needed_lens(self, examples: Sequence[Example]) -> list[tuple[int, int]]:
        """needed_len of each example, prefetched block by block."""
        out: list[tuple[int, int]] = []
        for i in range(0, len(examples), BLOCK):
            with self.prefetched(examples[i : i + BLOCK], lengths=True):
                out += [self.needed_len(ex) for ex in examples[i : i + BLOCK]]
        return out

    # -- API ---------------------------------------------------------------------------------------
    def __call__(self, ex: Example) -> dict[str, list[int]]:
        f = self.format(ex)
        return f.feature if f.feature is not None else {"input_ids": [], "labels": []}

    def many(self, examples: Sequence[Example]) -> list[dict[str, list[int]]]:
        """Tokenize; dropped examples (template alone ≥ max_seq_len) are left out: see format_all for counts."""
        return self.format_all(examples)[0]

    def format_all(self, examples: Sequence[Example]) -> tuple[list[dict[str, list[int]]], dict]:
        """(kept features, stats): stats = counts per outcome, drop reasons, untruncated token lengths."""
        feats, counts, reasons, lengths = [], Counter({o: 0 for o in OUTCOMES}), Counter(), []
        for f in self.format_each(examples):
            counts[f.outcome] += 1
            lengths.append(f.length)
            if f.feature is None:
                reasons[f.reason] += 1
            else:
                feats.append(f.feature)
        return feats, {"counts": dict(counts), "drop_reasons": dict(reasons), "lengths": lengths}

    def format_each(self, examples: Sequence[Example]) -> Iterator[Formatted]:
        """format() of each example in order, prefetched block by block."""
        for i in range(0, len(examples), BLOCK):
            with self.prefetched(examples[i : i + BLOCK]):
                yield from (self.format(ex) for ex in examples[i : i + BLOCK])


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
