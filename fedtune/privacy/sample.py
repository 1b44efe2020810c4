"""Sample-level DP: DP-SGD (opacus) on the trainable parameters only (LoRA A/B, Fed-SB R, ...).

Each optimiser step draws a Poisson batch (every example independently with rate q = E/N_k, E = batch_size ×
grad_accum), computes per-example gradients with opacus' hooks (GradSampleModule; peft's LoRA factors are
plain nn.Linear), clips each example's gradient to C, sums, adds N(0, σ²C²) and divides by E (DPOptimizer),
then AdamW steps. The per-example loss is the mean token loss of that example, so no example's gradient
depends on the others in its batch (`zo.example_losses`, shared with FedKSeed: it shifts the labels, not the
logits, so the cross-entropy runs over contiguous (B·T, V) logits; the old strided (B, V, T−1) form made a
SmolLM2 DP step ~10 % slower than the non-DP one). The opacus wrapper is always detached afterwards: the caller gets its
own module back with no hooks or grad_sample attributes, and the frozen base is never touched.

Zeroth-order (FedKSeed) steps use the same mechanism on scalars: each step's Poisson batch gives one projected
gradient g_i per example; `private_scalar_mean` releases (Σ_i clip(g_i, ±C) + N(0, σ²C²)) / E. The sensitivity of
the sum to adding or removing one example is C, exactly as for DP-SGD's clipped vectors, so the same accountant
step (σ, q) applies: one per ZO step.

The per-client accountant lives in `SampleLevelDP` (one per ClientAlgorithm instance, keyed by client id);
`SampleLevelDP.run` wraps any per-round DP training loop (first-order or zeroth-order) with calibration,
budget check and accounting.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from fedtune.data.format import collate
from fedtune.privacy.accounting import Accountant, noise_for_target
from fedtune.privacy.config import PrivacyConfig
from fedtune.training.loop import (
    LocalTrainConfig,
    StepHook,
    Steps,
    StepsFactory,
    TrainResult,
    train_local,
    trainable_parameters,
)
from fedtune.training.zo import example_losses as per_example_loss  # (B,) mean token loss of each example

if TYPE_CHECKING:  # opacus is imported where it is used (see fedtune/privacy/accounting.py)
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

_MODULE_ATTRS = ("activations", "max_batch_len", "autograd_grad_sample_hooks")
R = TypeVar("R")


class PrivacyBudgetExhausted(RuntimeError):
    """Another round would push this client's ε above its target_epsilon."""


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
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

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


def dp_steps(*, noise_multiplier: float, max_grad_norm: float, generator: torch.Generator | None = None,
             ) -> StepsFactory:
    """The `steps` of fedtune.training.loop.train_local for DP-SGD(AdamW): each step a Poisson batch (rate
    q = min(1, batch_size·grad_accum / N), opacus' sampler) in micro-batches of at most batch_size, the per-example
    loss summed, and opacus' DPOptimizer (clip each example to C = max_grad_norm, Σ + N(0, σ²C²), ÷ E). cfg's
    max_grad_norm is not used (C clips per example)."""
    g = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))

    @contextmanager
    def steps(model: nn.Module, params: list[nn.Parameter], features: Sequence[dict], cfg: LocalTrainConfig,
              pad_id: int) -> Iterator[Steps]:
        if not features:
            raise ValueError("no training examples for this client")
        n = len(features)
        expected = min(cfg.batch_size * cfg.grad_accum, n)
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=expected / n, generator=g, steps=cfg.steps)
        with warnings.catch_warnings():
            # benign with frozen inputs: opacus only needs the gradient w.r.t. the LoRA modules' outputs
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            with dp_training(model, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             expected_batch_size=expected, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             generator=g) as (gsm, opt):

                def loss(module: nn.Module, batch: dict[str, torch.Tensor], _: int) -> tuple[torch.Tensor, float]:
                    per_ex = per_example_loss(module, batch)
                    return per_ex.sum(), per_ex.mean().item()

                def empty() -> None:  # the step is pure noise (and still accounted)
                    for p in opt.params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

                micro = ([collate([features[j] for j in idx[i : i + cfg.batch_size]], pad_id)
                          for i in range(0, len(idx), cfg.batch_size)] for idx in sampler)
                yield Steps(gsm, opt, opt.original_optimizer, micro, loss, on_empty=empty)

    return steps


def private_train_local(
    model: nn.Module, features: Sequence[dict], cfg: LocalTrainConfig, *, noise_multiplier: float,
    max_grad_norm: float, pad_id: int, generator: torch.Generator | None = None,
    on_step: Callable[[int, float], None] | None = None, hooks: Sequence[StepHook] = (),
) -> TrainResult:
    """cfg.steps DP-SGD(AdamW) steps through the one training loop (see dp_steps)."""
    return train_local(model, features, cfg, pad_id=pad_id, on_step=on_step, hooks=hooks,
                       steps=dp_steps(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                      generator=generator))


def poisson_batches(num_examples: int, expected_batch: int, steps: int,
                    generator: torch.Generator) -> Iterator[list[int]]:
    """`steps` Poisson batches of example indices: each example independently with rate expected / N (opacus)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    return iter(UniformWithReplacementSampler(num_samples=num_examples, sample_rate=expected_batch / num_examples,
                                              generator=generator, steps=steps))


def clip_scalars(values: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-example clipping of scalars: each value into [−C, C] (the scalar case of clipping the L2 norm to C)."""
    return values.clamp(-clip, clip)


def private_scalar_mean(values: torch.Tensor, *, clip: float, noise_multiplier: float, expected_batch: int,
                        generator: torch.Generator) -> float:
    """Gaussian mechanism on a sum of per-example scalars: (Σ_i clip(v_i, ±C) + N(0, σ²C²)) / E.

    With σ = 0 and C = ∞ this is float(Σ_i v_i) / E — bit-for-bit the plain mean when E = len(values)."""
    total = float(clip_scalars(values, clip).sum())
    if noise_multiplier > 0:
        total += noise_multiplier * clip * float(torch.randn((), generator=generator, dtype=torch.float64))
    return total / expected_batch


@dataclass(frozen=True)
class DPRound:
    """One client round's DP parameters: σ, C, q = E / N, E and the generator for Poisson sampling and noise."""

    noise_multiplier: float
    clip: float
    sample_rate: float
    expected_batch: int
    generator: torch.Generator


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

    def run(self, client_id: str, num_examples: int, expected_batch: int, steps: int, seed: int,
            privacy: dict[str, Any] | PrivacyConfig, body: Callable[[DPRound], R]) -> tuple[R, dict[str, float]]:
        """One round of DP training for `client_id`: calibrate σ, refuse a round that would exceed the budget,
        run `body` (`steps` mechanism releases at q = expected_batch / num_examples), account it.
        Returns (body's result, metrics: epsilon, delta, noise_multiplier, sample_rate)."""
        d = dict(privacy) if isinstance(privacy, dict) else privacy.to_dict()
        rounds = d.pop("rounds", None)
        pc = PrivacyConfig.from_dict(d)
        if pc.mode != "sample":
            raise ValueError(f"SampleLevelDP called with privacy mode {pc.mode!r}")
        if num_examples <= 0:
            raise ValueError("no training examples for this client")
        n = num_examples
        q = expected_batch / n
        delta = pc.sample_delta(n)
        sigma = self.noise_multiplier(pc, n, q, steps, rounds)
        acc = self.accountants.setdefault(client_id, Accountant(pc.accountant))
        if pc.target_epsilon is not None and acc.would_exceed(pc.target_epsilon, delta, sigma, q, steps):
            raise PrivacyBudgetExhausted(
                f"client {client_id}: another round would exceed target_epsilon={pc.target_epsilon} "
                f"(ε now {acc.epsilon(delta):.3f} at δ={delta:g})")
        # noise_seed: reproducible simulations; otherwise OS randomness (nobody can predict the noise)
        gen_seed = pc.noise_seed * 1_000_003 + seed if pc.noise_seed is not None else secrets.randbits(63)
        res = body(DPRound(sigma, pc.max_grad_norm, q, expected_batch, torch.Generator().manual_seed(gen_seed)))
        acc.step(sigma, q, steps)
        return res, {"epsilon": acc.epsilon(delta), "delta": delta, "noise_multiplier": sigma, "sample_rate": q}

    def train(self, model: nn.Module, client_id: str, features: Sequence[dict], cfg: LocalTrainConfig,
              privacy: dict[str, Any] | PrivacyConfig, *, pad_id: int,
              on_step: Callable[[int, float], None] | None = None,
              hooks: Sequence[StepHook] = ()) -> tuple[TrainResult, dict[str, float]]:
        """One round of DP-SGD local training for `client_id`; returns (result, metrics with epsilon/delta)."""
        expected = min(cfg.batch_size * cfg.grad_accum, len(features))
        return self.run(client_id, len(features), expected, cfg.steps, cfg.seed, privacy,
                        lambda dp: private_train_local(model, features, cfg, noise_multiplier=dp.noise_multiplier,
                                                       max_grad_norm=dp.clip, pad_id=pad_id, generator=dp.generator,
                                                       on_step=on_step, hooks=hooks))

    def state_dict(self) -> dict[str, Any]:
        return {cid: a.state_dict() for cid, a in sorted(self.accountants.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountants = {cid: Accountant.from_state(s) for cid, s in state.items()}
