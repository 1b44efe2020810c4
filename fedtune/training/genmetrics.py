"""Generation metrics: Rouge-L and exact match of greedy generations against reference responses.

Rouge-L (Lin 2004), as FedKSeed reports it on Natural Instructions and Dolly: with LCS the longest common
subsequence of the candidate's and the reference's tokens, P = LCS/|cand|, R = LCS/|ref|, F = 2PR/(P+R)
(`rouge-score`'s default tokenizer: lower-cased, non-alphanumerics dropped, no stemming). Exact match: 1 when the
two strings are equal after lower-casing and collapsing whitespace. Both are averaged over examples.

The prompt of an example is its tokens up to its first response token; the reference is that first response
(the first assistant turn, as cut to [data] max_seq_len), decoded without special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtune.data.format import IGNORE
from fedtune.models.hardware import model_device


def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:  # pragma: no cover - declared in the base dependencies
        raise ImportError("Rouge-L needs the rouge-score package: pip install rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def normalize(s: str) -> str:
    return " ".join(s.lower().split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def score(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """{examples, rouge_l, exact_match}: means over the pairs (None when there are none)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} generations for {len(refs)} references")
    if not preds:
        return {"generated": 0, "rouge_l": None, "exact_match": None}
    sc = _scorer()
    rl = [sc.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)]
    em = [exact_match(p, r) for p, r in zip(preds, refs, strict=True)]
    return {"generated": len(preds), "rouge_l": sum(rl) / len(rl), "exact_match": sum(em) / len(em)}


def prompt_and_reference(feature: dict, tok) -> tuple[list[int], str] | None:
    """(prompt token ids, reference text) of a formatted example; None when it has no prompt (a plain-text
    example trains on every token) or no response left after truncation."""
    labels = feature["labels"]
    start = next((i for i, lab in enumerate(labels) if lab != IGNORE), None)
    if not start:  # None: no response tokens; 0: no prompt
        return None
    end = start
    while end < len(labels) and labels[end] != IGNORE:
        end += 1
    return list(feature["input_ids"][:start]), tok.decode(labels[start:end], skip_special_tokens=True).strip()


@torch.no_grad()
def greedy(model, tok, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The greedy continuation of `prompt_ids`, decoded without special tokens."""
    ids = torch.tensor([prompt_ids], device=model_device(model))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True).strip()


def generation_metrics(model, tok, features: Sequence[dict], *, max_examples: int, max_new_tokens: int = 64
                       ) -> dict[str, Any]:
    """Rouge-L and exact match of greedy generations on the first `max_examples` usable examples (0: all)."""
    pairs = [p for p in (prompt_and_reference(f, tok) for f in features) if p is not None]
    if max_examples > 0:
        pairs = pairs[:max_examples]
    was_training = model.training
    model.eval()
    try:
        preds = [greedy(model, tok, ids, max_new_tokens) for ids, _ in pairs]
    finally:
        model.train(was_training)
    return score(preds, [r for _, r in pairs])
