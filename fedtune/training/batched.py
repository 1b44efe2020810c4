"""Train K clients' LoRA adapters at once on one shared base: one batched forward/backward per step.

In simulation every client of a round starts from the same global adapter and trains on its own batches.
Instead of K sequential loops, each peft LoRA factor (lora_A / lora_B of the active adapter) is swapped for a
`ClientStackedLinear` holding K independent weights (K, out, in); the K clients' batches are concatenated
along the batch dimension (client k owns rows k·b … (k+1)·b − 1), and each slice is multiplied by its own
client's factor with one bmm. The loss is Σ_k L_k (each L_k the client's own mean token loss), so each
client's gradient is exactly its own; AdamW is elementwise, so one optimiser over the stacked tensors equals
K independent ones; gradient clipping is per client. Same batches, same seeds: the result equals K sequential
runs up to float rounding (checked by tests/test_batched.py at 1e-5).

Shapes: x (K·b, T, d_in) → view (K, b·T, d_in) → bmm W_kᵀ → (K, b·T, d_out) → view (K·b, T, d_out).

Memory: the K clients' logits (K·b, T, vocab) would dominate (SmolLM2: 8 clients × 8 × 512 tokens × 49152 ×
4 B = 6.4 GB). The loss is computed from the decoder's hidden states instead, projecting only response
positions, LOSS_CHUNK rows at a time, each chunk recomputed in the backward (per_client_loss_chunked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedtune.data.format import IGNORE
from fedtune.training.loop import LocalTrainConfig, StepHook, TrainResult, batches, run_hooks


class ClientStackedLinear(nn.Module):
    """K bias-free linear maps applied to K equal slices of the batch. weight: (K, out, in)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        xs = x.reshape(k, -1, x.shape[-1])  # (K, b·T, in)
        return torch.bmm(xs, self.weight.transpose(1, 2)).reshape(*x.shape[:-1], -1)


def _pad_to(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    extra = length - batch["input_ids"].shape[1]
    if extra == 0:
        return batch
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    return {k: nn.functional.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


def per_client_loss(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(K,) each client's mean next-token loss over its own response tokens (what HF returns per batch)."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]  # (K·b, T-1, V), (K·b, T-1)
    tok = nn.functional.cross_entropy(lg.transpose(1, 2), lb, ignore_index=IGNORE, reduction="none")
    tok = tok.reshape(k, -1)
    count = (lb != IGNORE).reshape(k, -1).sum(1)
    return tok.sum(1) / count.clamp(min=1)


LOSS_CHUNK = 1024  # response tokens per chunk of the vocabulary projection in the batched loss


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, LM head) of a Hugging Face causal LM (peft-wrapped or not) whose logits are plainly
    head(hidden), else None (the batched loss then takes the model's full logits)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    dec, head = getattr(base, "model", None), base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return (dec, head) if isinstance(dec, nn.Module) and isinstance(head, nn.Module) else None


def per_client_loss_chunked(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, k: int,
                            chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """per_client_loss from the last hidden states (K·b, T, d) without the (K·b, T, V) logits: only response
    positions are projected, `chunk` rows at a time, each chunk's logits recomputed in the backward
    (torch.utils.checkpoint), so at most one chunk of logits exists at once."""
    lb = labels[:, 1:].reshape(-1)
    owner = torch.arange(k).repeat_interleave(lb.numel() // k)  # client of each position
    idx = (lb != IGNORE).nonzero().squeeze(1)
    h, lb, owner = hidden[:, :-1].reshape(-1, hidden.shape[-1])[idx], lb[idx], owner[idx]

    def part_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(head(x).float(), y, reduction="none")

    total = hidden.new_zeros(k, dtype=torch.float32)
    for i in range(0, len(idx), chunk):
        part = torch.utils.checkpoint.checkpoint(part_loss, h[i:i + chunk], lb[i:i + chunk], use_reentrant=False)
        total = total.index_add(0, owner[i:i + chunk], part)
    return total / torch.bincount(owner, minlength=k).clamp(min=1)


def batchable(configs: Sequence[dict[str, Any]], sizes: Sequence[int]) -> list[LocalTrainConfig] | None:
    """The clients' parsed configs if they can train in one batched loop, else None: it needs one shared
    schedule, equal batch sizes (every client has ≥ batch_size examples) and no DP (per-client accounting)."""
    if len(configs) < 2 or any(c.get("privacy") for c in configs):
        return None
    cfgs = [LocalTrainConfig.from_dict(c) for c in configs]
    first = cfgs[0]
    same = all((c.steps, c.batch_size, c.grad_accum, c.lr, c.weight_decay, c.max_grad_norm)
               == (first.steps, first.batch_size, first.grad_accum, first.lr, first.weight_decay, first.max_grad_norm)
               for c in cfgs)
    return cfgs if same and min(sizes) >= first.batch_size else None


def train_lora_clients(
    layers: dict[str, nn.Module],
    adapter: str,
    model: nn.Module,
    starts: Sequence[dict[str, torch.Tensor]],
    features: Sequence[Sequence[dict]],
    cfgs: Sequence[LocalTrainConfig],
    *,
    pad_id: int,
    hooks: Sequence[StepHook] = (),
) -> list[tuple[dict[str, torch.Tensor], TrainResult]]:
    """Train len(starts) clients together; `layers` are the model's peft LoraLayers ({module: layer}),
    `starts[k]` client k's initial {"<module>.A", "<module>.B"}. Returns each client's trained factors
    and result. The model's own lora_A/lora_B modules are restored afterwards (values unchanged). `hooks` as in
    fedtune.training.loop (they see the stacked (K, …) factors: an elementwise hook acts on each client alone)."""
    k, cfg = len(starts), cfgs[0]
    saved = {}
    params = []
    for name, layer in layers.items():
        saved[name] = (layer.lora_A[adapter], layer.lora_B[adapter])
        a = ClientStackedLinear(torch.stack([s[f"{name}.A"] for s in starts]).clone())  # (K, r, d_in)
        b = ClientStackedLinear(torch.stack([s[f"{name}.B"] for s in starts]).clone())  # (K, d_out, r)
        layer.lora_A[adapter], layer.lora_B[adapter] = a, b
        params += [a.weight, b.weight]
    try:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if hooks:  # after the per-client clipping, before the update (as in the one-client loop)
            opt.register_step_pre_hook(run_hooks(hooks, params))
        streams = [batches(f, c.batch_size, c.seed, pad_id) for f, c in zip(features, cfgs, strict=True)]
        losses: list[list[float]] = [[] for _ in range(k)]
        split = decoder_and_head(model)
        model.train()
        for _ in range(cfg.steps):
            for _ in range(cfg.grad_accum):
                parts = [next(s) for s in streams]
                t = max(p["input_ids"].shape[1] for p in parts)
                parts = [_pad_to(p, t, pad_id) for p in parts]
                batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
                if split is None:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss_k = per_client_loss(logits, batch["labels"], k)  # (K,)
                else:  # no (K·b, T, vocab) logits: the projection and loss chunked over response tokens
                    hidden = split[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
                    loss_k = per_client_loss_chunked(hidden, split[1], batch["labels"], k)
                (loss_k.sum() / cfg.grad_accum).backward()
                for i, v in enumerate(loss_k.tolist()):
                    losses[i].append(v)
            if cfg.max_grad_norm > 0:  # torch.nn.utils.clip_grad_norm_, per client
                norms = torch.sqrt(sum(p.grad.pow(2).flatten(1).sum(1) for p in params))  # (K,)
                coef = (cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
                for p in params:
                    p.grad.mul_(coef.view(-1, *([1] * (p.grad.dim() - 1))))
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        out = []
        for i in range(k):
            tensors = {}
            for name, layer in layers.items():
                tensors[f"{name}.A"] = layer.lora_A[adapter].weight[i].detach().clone()
                tensors[f"{name}.B"] = layer.lora_B[adapter].weight[i].detach().clone()
            res = TrainResult(loss=sum(losses[i]) / len(losses[i]), steps=cfg.steps,
                              examples_seen=cfg.steps * cfg.grad_accum * cfg.batch_size, losses=losses[i])
            out.append((tensors, res))
        return out
    finally:
        for name, layer in layers.items():
            layer.lora_A[adapter], layer.lora_B[adapter] = saved[name]

