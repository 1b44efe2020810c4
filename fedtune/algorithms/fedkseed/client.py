"""FedKSeed client: replay the global (seed, η·H) pairs; train with τ SPSA steps; upload (seed_idx, g)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedtune.algorithms.base import ClientAlgorithm, ClientUpdate, Payload, TrainContext
from fedtune.algorithms.fedkseed.server import PROBS, SEEDS, round_key
from fedtune.algorithms.lora_common import (
    activate,
    attach_lora,
    get_lora_state,
    init_lora_factors,
    lora_shapes,
    set_lora_state,
)
from fedtune.training.local import batches
from fedtune.training.zo import apply_update, spsa_step, zo_parameters

ADAPTER = "fedkseed"
INDEX_STREAM = 0x5EED  # offsets the seed-index RNG from the batch-order RNG (both derive from config["seed"])
NOISE_STREAM = 0xD9  # offsets the DP-noise RNG


def clip_grad(g: float, clip: float) -> float:
    """Clamp the scalar projected gradient to ±clip (clip = 0: unchanged)."""
    return max(-clip, min(clip, g)) if clip > 0 else g


def dp_noise(g: float, *, clip: float, sigma: float, gen: torch.Generator) -> float:
    """Gaussian mechanism on one step's scalar: clip(g, ±C) + N(0, σ²C²).

    TODO(privacy): the privacy module owns the accounting (one release per step, sampling rate of the batch).
    With batch size > 1 sample-level DP needs per-example clipping of g_i = (L_i(θ+εz) − L_i(θ−εz)) / 2ε
    (same two forwards, reduction="none") before averaging; this hook clips the batch's g only.
    """
    return clip_grad(g, clip) + sigma * clip * float(torch.randn((), generator=gen, dtype=torch.float64))


class FedKSeedClient(ClientAlgorithm):
    def __init__(self) -> None:
        super().__init__()
        self.seeds: list[int] | None = None  # the K candidate seeds
        self.probs: torch.Tensor | None = None  # "pro" sampling probabilities float32 [K]
        self.lora = False

    def setup(self, model: nn.Module, payload: Payload) -> nn.Module:
        m = payload.meta
        self.seeds = payload.tensors[SEEDS].tolist()
        self.lora = m["trainable"] == "lora"
        if self.lora:
            # A ~ kaiming (seeded by the run seed, identical on every client), B = 0: the model starts at the base.
            model = attach_lora(model, adapter=ADAPTER, rank=m["rank"], alpha=m["alpha"], targets=m["target_modules"])
            activate(model, ADAPTER)
            shapes = lora_shapes(model, m["target_modules"])
            set_lora_state(model, ADAPTER, init_lora_factors(shapes, m["rank"], seed=m["lora_seed"]))
        else:
            model.requires_grad_(True)
        bad = [n for n, p in zo_parameters(model) if p.dtype != torch.float32]
        if bad:
            raise ValueError(
                f"FedKSeed needs float32 trainable parameters (ε-perturbations vanish in half "
                f"precision); {bad[0]} is not: load the model in float32"
            )
        return model

    @torch.no_grad()
    def sync(self, model: nn.Module, payload: Payload) -> None:
        """θ ← θ − Σ_s coeff_v[s]·z(seed_s) for every missed round v, in order (coeff = η·H)."""
        if self.seeds is None:
            raise RuntimeError("sync() before setup(): the client has no candidate seeds")
        params = zo_parameters(model)
        for v in payload.meta.get("replay_versions", []):
            idx, coeff = payload.tensors[round_key(v, "seed_idx")], payload.tensors[round_key(v, "coeff")]
            for i, c in zip(idx.tolist(), coeff.tolist()):
                apply_update(params, self.seeds[i], c)
        if PROBS in payload.tensors:
            self.probs = payload.tensors[PROBS].clone()

    def _seed_indices(self, steps: int, config: dict[str, Any]) -> torch.Tensor:
        """τ candidate indices, uniform or by the "pro" probabilities; seeded by config["seed"]. int64 [τ]."""
        gen = torch.Generator().manual_seed(int(config.get("seed", 0)) + INDEX_STREAM)
        if config.get("seed_sampling", "uniform") == "pro" and self.probs is not None:
            return torch.multinomial(self.probs.double(), steps, replacement=True, generator=gen)
        return torch.randint(len(self.seeds), (steps,), generator=gen)

    def train(self, model: nn.Module, ctx: TrainContext, config: dict[str, Any]) -> ClientUpdate:
        if self.seeds is None:
            raise RuntimeError("train() before setup(): the client has no candidate seeds")
        steps, lr, eps = int(config["steps"]), float(config["lr"]), float(config["eps"])
        clip, seed = float(config.get("grad_clip", 0.0)), int(config.get("seed", 0))
        dp_c, dp_sigma = float(config.get("dp_clip", 0.0)), float(config.get("dp_noise_multiplier", 0.0))
        if dp_sigma > 0 and not dp_c > 0:
            raise ValueError(f"dp_noise_multiplier = {dp_sigma} needs dp_clip > 0 (the noise is σ·C); set dp_clip")
        noise_gen = torch.Generator().manual_seed(seed + NOISE_STREAM)
        params = zo_parameters(model)
        backup = [p.detach().clone() for _, p in params]  # exact restore (one model copy in full mode)
        idx = self._seed_indices(steps, config)
        stream = batches(ctx.features, int(config.get("batch_size", 8)), seed, ctx.pad_id)
        was_training, grads, losses, clipped, skipped = model.training, [], [], 0, 0
        model.eval()  # no dropout: both SPSA forwards must see the same function
        try:
            for t in range(steps):
                s = self.seeds[int(idx[t])]
                g, loss_plus, loss_minus = spsa_step(model, params, next(stream), s, eps)
                if not math.isfinite(g):
                    g, skipped = 0.0, skipped + 1  # diverged forward: skip the step, keep the record
                clipped += int(clip > 0 and abs(g) > clip)
                g = clip_grad(g, clip)
                if dp_sigma > 0:
                    g = dp_noise(g, clip=dp_c, sigma=dp_sigma, gen=noise_gen)
                g = float(torch.tensor(g, dtype=torch.float32))  # what is uploaded is what was applied
                apply_update(params, s, lr * g)
                grads.append(g)
                losses.append(0.5 * (loss_plus + loss_minus))
                if ctx.on_step is not None:
                    ctx.on_step(t, losses[-1])
        finally:
            with torch.no_grad():
                for (_, p), b in zip(params, backup):
                    p.copy_(b)
            model.train(was_training)
        tensors = {"seed_idx": idx.to(torch.int32), "grad": torch.tensor(grads, dtype=torch.float32)}  # [τ], [τ]
        metrics = {
            "train_loss": sum(losses) / max(len(losses), 1),
            "zo_clipped_frac": clipped / max(steps, 1),
            "zo_skipped_steps": float(skipped),
            "zo_grad_abs_mean": sum(map(abs, grads)) / max(steps, 1),
        }
        return ClientUpdate(ctx.client_id, len(ctx.features), tensors, metrics)

    def export_factors(self, model: nn.Module):
        """LoRA mode: the global adapter {module: (A, s·B)}; full mode: None (the result is the merged model)."""
        if not self.lora:
            return None
        st = get_lora_state(model, ADAPTER, fold_scale=True)
        return {k[:-2]: (st[f"{k[:-2]}.A"], st[f"{k[:-2]}.B"]) for k in st if k.endswith(".A")}
