"""Sample-level DP: DP-SGD (opacus) on the trainable parameters only (LoRA A/B, Fed-SB R, ...).

Each optimiser step draws a Poisson batch (every example independently with rate q = E/N_k, E = batch_size ×
grad_accum), computes per-example gradients with opacus' hooks (GradSampleModule; peft's LoRA factors are
plain nn.Linear), clips each example's gradient to C, sums, adds N(0, σ²C²) and divides by E (DPOptimizer),
then AdamW steps. The per-example loss is the mean token loss of that example, so no example's gradient
depends on the others in its batch. The opacus wrapper is always detached afterwards: the caller gets its
own module back with no hooks or grad_sample attributes, and the frozen base is never touched.

The per-client accountant lives in `SampleLevelDP` (one per ClientAlgorithm instance, keyed by client id).
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from fedtune.data.format import IGNORE, collate
from fedtune.privacy.accounting import Accountant, noise_for_target
from fedtune.privacy.config import PrivacyConfig
from fedtune.training.local import LocalTrainConfig, TrainResult, trainable_parameters

_MODULE_ATTRS = ("activations", "max_batch_len", "autograd_grad_sample_hooks")


class PrivacyBudgetExhausted(RuntimeError):
    """Another round would push this client's ε above its target_epsilon."""


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) mean next-token cross-entropy over each example's response tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lg, lb = logits[:, :-1].float(), batch["labels"][:, 1:]
    tok = nn.functional.cross_entropy(lg.transpose(1, 2), lb, ignore_index=IGNORE, reduction="none")  # (B, T-1)
    return tok.sum(1) / (lb != IGNORE).sum(1).clamp(min=1)


def _strip_opacus(model: nn.Module) -> None:
    for mod in model.modules():
        for a in _MODULE_ATTRS:
            if a in mod.__dict__:
                delattr(mod, a)
    for p in model.parameters():
        for a in ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad"):
            if hasattr(p, a):
                delattr(p, a)


@contextmanager
def dp_training(
    model: nn.Module, *, noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
    lr: float, weight_decay: float = 0.0, generator: torch.Generator | None = None,
) -> Iterator[tuple[GradSampleModule, DPOptimizer]]:
    """Attach opacus to `model`'s trainable parameters for the duration of the block.

    Yields (wrapped model, DP optimiser over AdamW). Backprop a SUM of per-example losses; `step()` then
    applies (Σ clip_C(g_i) + N(0, σ²C²)) / expected_batch_size. On exit every hook and opacus attribute is
    removed and `model.grad` is cleared, whether or not the block raised."""
    params = trainable_parameters(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        opt = DPOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
                          noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                          expected_batch_size=expected_batch_size, loss_reduction="sum", generator=generator)

        def average(o: DPOptimizer) -> None:  # "mean" over the EXPECTED batch size (Poisson)
            for p in o.params:
                p.grad /= expected_batch_size

        opt.attach_step_hook(average)
        yield gsm, opt
    finally:
        gsm.to_standard_module()
        _strip_opacus(model)
        model.zero_grad(set_to_none=True)


def private_train_local(
    model: nn.Module, features: Sequence[dict], cfg: LocalTrainConfig, *, noise_multiplier: float,
    max_grad_norm: float, pad_id: int, generator: torch.Generator | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """cfg.steps DP-SGD(AdamW) steps; Poisson rate q = min(1, batch_size·grad_accum / N). Micro-batches of at
    most cfg.batch_size share one DP step. cfg.max_grad_norm is ignored (C = max_grad_norm clips per example)."""
    if not features:
        raise ValueError("no training examples for this client")
    n = len(features)
    expected = min(cfg.batch_size * cfg.grad_accum, n)
    g = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=expected / n, generator=g, steps=cfg.steps)
    losses: list[float] = []
    seen = 0
    model.train()
    with warnings.catch_warnings():
        # benign with frozen inputs: opacus only needs the gradient w.r.t. the LoRA modules' outputs
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        try:
            with dp_training(model, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             expected_batch_size=expected, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             generator=g) as (gsm, opt):
                for step, idx in enumerate(sampler):
                    for i in range(0, len(idx), cfg.batch_size):
                        batch = collate([features[j] for j in idx[i : i + cfg.batch_size]], pad_id)
                        per_ex = per_example_loss(gsm, batch)
                        per_ex.sum().backward()
                        losses.append(per_ex.mean().item())
                    if not idx:  # empty Poisson batch: the step is pure noise (and still accounted)
                        for p in opt.params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    seen += len(idx)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if on_step is not None:
                        on_step(step, losses[-1] if idx else float("nan"))  # nan: empty Poisson batch
        finally:
            model.eval()
    mean = sum(losses) / len(losses) if losses else float("nan")
    return TrainResult(loss=mean, steps=cfg.steps, examples_seen=seen, losses=losses)


class SampleLevelDP:
    """Per-client accountants for sample-level DP. Keep ONE instance per ClientAlgorithm (it outlives rounds);
    `state_dict()` is JSON-able for client-side checkpoints."""

    def __init__(self) -> None:
        self.accountants: dict[str, Accountant] = {}

    def noise_multiplier(self, pc: PrivacyConfig, num_examples: int, sample_rate: float, steps: int,
                         rounds: int | None) -> float:
        if pc.noise_multiplier is not None:
            return pc.noise_multiplier
        if not rounds:
            raise ValueError("sample-level DP with target_epsilon needs the planned number of rounds: pass "
                             "config['privacy']['rounds'] (the engine's total rounds) so σ can be calibrated")
        return noise_for_target(pc.target_epsilon, pc.sample_delta(num_examples), sample_rate, steps * rounds,
                                pc.accountant)

    def train(self, model: nn.Module, client_id: str, features: Sequence[dict], cfg: LocalTrainConfig,
              privacy: dict[str, Any] | PrivacyConfig, *, pad_id: int,
              on_step: Callable[[int, float], None] | None = None) -> tuple[TrainResult, dict[str, float]]:
        """One round of DP local training for `client_id`; returns (result, metrics with epsilon/delta)."""
        d = dict(privacy) if isinstance(privacy, dict) else privacy.to_dict()
        rounds = d.pop("rounds", None)
        pc = PrivacyConfig.from_dict(d)
        if pc.mode != "sample":
            raise ValueError(f"SampleLevelDP.train called with privacy mode {pc.mode!r}")
        n = len(features)
        q = min(cfg.batch_size * cfg.grad_accum, n) / max(n, 1)
        delta = pc.sample_delta(n)
        sigma = self.noise_multiplier(pc, n, q, cfg.steps, rounds)
        acc = self.accountants.setdefault(client_id, Accountant(pc.accountant))
        if pc.target_epsilon is not None and acc.would_exceed(pc.target_epsilon, delta, sigma, q, cfg.steps):
            raise PrivacyBudgetExhausted(
                f"client {client_id}: another round would exceed target_epsilon={pc.target_epsilon} "
                f"(ε now {acc.epsilon(delta):.3f} at δ={delta:g})")
        gen = None
        if pc.noise_seed is not None:
            gen = torch.Generator().manual_seed(pc.noise_seed * 1_000_003 + cfg.seed)
        res = private_train_local(model, features, cfg, noise_multiplier=sigma, max_grad_norm=pc.max_grad_norm,
                                  pad_id=pad_id, generator=gen, on_step=on_step)
        acc.step(sigma, q, cfg.steps)
        return res, {"epsilon": acc.epsilon(delta), "delta": delta, "noise_multiplier": sigma, "sample_rate": q}

    def state_dict(self) -> dict[str, Any]:
        return {cid: a.state_dict() for cid, a in sorted(self.accountants.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountants = {cid: Accountant.from_state(s) for cid, s in state.items()}
