"""FedKSeed client: replay the global (seed, η·H) pairs; train with τ SPSA steps; upload (seed_idx, g).

Sample-level DP ([privacy] mode = "sample", DP zeroth-order): each step draws a Poisson batch (rate q = E / N,
E = batch_size), gets g_i for every example from the step's two forwards, and uses
g = (Σ_i clip(g_i, ±C) + N(0, σ²C²)) / E — one Gaussian-mechanism release of a scalar per step, accounted by the
client's opacus accountant (SampleLevelDP.run: q, τ steps per round). The noise is O(σC/E) on ONE scalar,
whatever the number of parameters. The uploaded g is the noised one, and it is what the client applied, so
replay stays exact; the wire format is unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from fedtune.algorithms.api import ClientAlgorithm, ClientUpdate, Payload, TrainContext
from fedtune.algorithms.common.lora import (
    activate,
    adapter_factors,
    attach_lora,
    fork_model,
    init_lora_factors,
    lora_shapes,
    set_lora_state,
)
from fedtune.algorithms.fedkseed.config import hardware_problem
from fedtune.algorithms.fedkseed.shared import MAX_SEEDS, PROBS, candidate_seeds, round_key
from fedtune.data.format import collate
from fedtune.models.hardware import HardwareError, Placement, placement
from fedtune.privacy.sample import DPRound, poisson_batches, private_scalar_mean
from fedtune.training.loop import batches
from fedtune.training.zo import (
    ParamBackup,
    apply_update,
    finish_step,
    keep_master_weights,
    mean_grad,
    spsa_example_grads,
    zo_parameters,
)

ADAPTER = "fedkseed"
INDEX_STREAM = 0x5EED  # offsets the seed-index RNG from the batch-order RNG (both derive from config["seed"])


def clip_grad(g: float, clip: float) -> float:
    """Clamp the scalar projected gradient to ±clip (clip = 0: unchanged)."""
    return max(-clip, min(clip, g)) if clip > 0 else g


class FedKSeedClient(ClientAlgorithm):
    def __init__(self) -> None:
        super().__init__()
        self.seeds: list[int] | None = None  # the K candidate seeds
        self.probs: torch.Tensor | None = None  # "pro" sampling probabilities float32 [K]
        self.lora = False
        self.compute_dtype: torch.dtype | None = None  # full on a half-precision base: the ZO forwards' autocast dtype

    def setup(self, model: nn.Module, payload: Payload, holding: Placement | None = None) -> nn.Module:
        m = payload.meta
        k, seed_set = m.get("num_seeds"), m.get("seed_set")
        if not (type(k) is int and 1 <= k <= MAX_SEEDS and type(seed_set) is int and -(2**63) <= seed_set < 2**64):
            raise ValueError(f"FedKSeed setup payload needs num_seeds in [1, {MAX_SEEDS}] and a 64-bit integer "
                             f"seed_set, got {k!r}, {seed_set!r}")
        self.seeds = candidate_seeds(k, seed_set).tolist()
        self.lora = m["trainable"] == "lora"
        held = holding or placement(model)  # how this client holds its base (its own choice: checked here)
        problem = hardware_problem(m["trainable"], held.quantization)
        if problem:
            raise HardwareError(problem)
        if self.lora:
            # A ~ kaiming (seeded by the run seed, identical on every client), B = 0: the model starts at the base.
            model = attach_lora(model, adapter=ADAPTER, rank=m["rank"], alpha=m["alpha"], targets=m["target_modules"])
            activate(model, ADAPTER)
            shapes = lora_shapes(model, m["target_modules"])
            set_lora_state(model, ADAPTER, init_lora_factors(shapes, m["rank"], seed=m["lora_seed"]))
        else:
            # float32 master weights on a bf16/fp16 base, forwards under autocast to it (zo module docstring)
            self.compute_dtype = keep_master_weights(model, held.dtype)
            model.requires_grad_(True)
        bad = [(n, p.dtype) for n, p in zo_parameters(model) if p.dtype != torch.float32]
        if bad:  # not reachable from load_model's holdings: a hand-built float64 model, say
            raise ValueError(f"FedKSeed perturbs float32 trainable parameters (z and the updates are float32); "
                             f"{bad[0][0]} is {bad[0][1]}: hold the model in float32 or bfloat16")
        return model

    @torch.no_grad()
    def sync(self, model: nn.Module, payload: Payload) -> None:
        """θ ← θ − Σ_s coeff_v[s]·z(seed_s) for every missed round v, in order (coeff = η·H)."""
        if self.seeds is None:
            raise RuntimeError("sync() before setup(): the client has no candidate seeds")
        params = zo_parameters(model)
        versions = payload.meta.get("replay_versions", [])
        for v in versions:  # check every round before replaying any: a bad one must not leave θ half-updated
            idx, coeff = payload.tensors[round_key(v, "seed_idx")], payload.tensors[round_key(v, "coeff")]
            if not (idx.dim() == coeff.dim() == 1 and len(idx) == len(coeff) and not idx.is_floating_point()
                    and idx.dtype != torch.bool and coeff.is_floating_point()):
                raise ValueError(f"fedkseed sync round {v}: seed_idx {idx.dtype} {tuple(idx.shape)} and coeff "
                                 f"{coeff.dtype} {tuple(coeff.shape)} must be integer and float vectors of one length")
            if len(idx) and not (0 <= int(idx.min()) and int(idx.max()) < len(self.seeds)):
                raise ValueError(f"fedkseed sync round {v}: seed indices outside [0, {len(self.seeds)})")
            if not bool(torch.isfinite(coeff).all()):
                raise ValueError(f"fedkseed sync round {v}: non-finite coefficients")
        probs = payload.tensors.get(PROBS)
        if probs is not None and not (tuple(probs.shape) == (len(self.seeds),) and probs.is_floating_point()
                                      and bool(torch.isfinite(probs).all()) and bool((probs >= 0).all())
                                      and float(probs.sum()) > 0):
            raise ValueError(f"fedkseed sync: {PROBS} must be {len(self.seeds)} finite non-negative weights, not all 0")
        for v in versions:
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
        priv = config.get("privacy")
        if priv and priv.get("mode") == "sample":
            steps, n = int(config["steps"]), len(ctx.features)
            expected = min(int(config.get("batch_size", 8)), n)
            update, privacy = self.dp.run(ctx.client_id, n, expected, steps, int(config.get("seed", 0)), priv,
                                          lambda dp: self._train(model, ctx, config, dp))
            update.metrics.update(privacy)
            return update
        return self._train(model, ctx, config, None)

    def step(self, model: nn.Module, params, parts: list[dict], seed: int, *, eps: float, lr: float,
             grad_clip: float, dp: DPRound | None) -> tuple[float, float, bool, bool]:
        """One ZO step in place, 3 z regenerations: +εz, −2εz (the two forwards), then the restore fused with
        the update θ ← θ − η·g·z. g = mean of the per-example g_i, or its DP release; clamped to ±grad_clip and
        rounded to float32 (what is uploaded is what was applied). Returns (g, mean loss, skipped, clamped)."""
        g_i, plus, minus = spsa_example_grads(model, params, parts, seed, eps, restore=False,
                                              compute_dtype=self.compute_dtype)
        loss = float((plus + minus).mean()) / 2 if g_i.numel() else float("nan")  # nan: empty Poisson batch
        if dp is None:
            g = mean_grad(g_i)
            skipped = not math.isfinite(g)
            g = 0.0 if skipped else g  # diverged forward: skip the step, keep the record
        else:
            bad = ~torch.isfinite(g_i)  # a diverged example contributes 0 (still one example: sensitivity C)
            g = private_scalar_mean(g_i.masked_fill(bad, 0.0), clip=dp.clip, noise_multiplier=dp.noise_multiplier,
                                    expected_batch=dp.expected_batch, generator=dp.generator)
            skipped = bool(bad.any())
        clamped = grad_clip > 0 and abs(g) > grad_clip
        g = float(torch.tensor(clip_grad(g, grad_clip), dtype=torch.float32))
        finish_step(params, seed, -eps if parts else 0.0, lr * g)
        return g, loss, skipped, clamped

    def _train(self, model: nn.Module, ctx: TrainContext, config: dict[str, Any], dp: DPRound | None) -> ClientUpdate:
        steps, lr, eps = int(config["steps"]), float(config["lr"]), float(config["eps"])
        clip, seed, bs = float(config.get("grad_clip", 0.0)), int(config.get("seed", 0)), int(config.get("batch_size", 8))
        if dp is None:
            stream = ([b] for b in batches(ctx.features, bs, seed, ctx.pad_id))
        else:  # Poisson batch of the step, in micro-batches of ≤ batch_size (one forward each per sign)
            feats = ctx.features
            stream = ([collate([feats[j] for j in ids[i : i + bs]], ctx.pad_id) for i in range(0, len(ids), bs)]
                      for ids in poisson_batches(len(feats), dp.expected_batch, steps, dp.generator))
        params = zo_parameters(model)
        idx = self._seed_indices(steps, config)
        was_training, grads, losses, clipped, skipped = model.training, [], [], 0, 0
        backup = ParamBackup(params)  # exact restore, spilled to a temp file: no second θ in memory
        model.eval()  # no dropout: both SPSA forwards must see the same function
        try:
            for t in range(steps):
                s = self.seeds[int(idx[t])]
                g, loss, skip, clamped = self.step(model, params, next(stream), s, eps=eps, lr=lr, grad_clip=clip,
                                                   dp=dp)
                skipped, clipped = skipped + int(skip), clipped + int(clamped)
                grads.append(g)
                losses.append(loss)
                if ctx.on_step is not None:
                    ctx.on_step(t, loss)
        finally:
            backup.restore()
            backup.close()
            model.train(was_training)
        tensors = {"seed_idx": idx.to(torch.int32), "grad": torch.tensor(grads, dtype=torch.float32)}  # [τ], [τ]
        seen = [x for x in losses if not math.isnan(x)]
        # Every metric costs ~25 B on the wire, a few % of a τ·8-byte upload: the zo_* counters only when nonzero
        # (absent = 0), and no mean |g| (the server computes it from the uploaded g: fedkseed_grad_abs_mean).
        metrics = {"train_loss": sum(seen) / len(seen) if seen else float("nan")}
        if clipped:
            metrics["zo_clipped_frac"] = clipped / max(steps, 1)
        if skipped:
            metrics["zo_skipped_steps"] = float(skipped)
        return ClientUpdate(ctx.client_id, len(ctx.features), tensors, metrics)

    def secure_vector(self, update: ClientUpdate, layout) -> dict[str, np.ndarray]:
        """The τ pairs densified over the K seeds: h[s] = Σ_{t: s_t = s} g_t; "pro" adds Σ |clip(g, ±pro_clip)|
        (pro_clip = the abs part's bound / τ) and the step count per seed."""
        idx = update.tensors["seed_idx"].long().numpy()
        g = update.tensors["grad"].double().numpy()
        out = {}
        for p in layout:
            v = np.zeros(p.shape, np.float64)
            if p.name == "h":
                np.add.at(v, idx, g)
            elif p.name == "abs":
                np.add.at(v, idx, np.abs(np.clip(g, -p.clip / max(len(g), 1), p.clip / max(len(g), 1))))
            elif p.name == "count":
                np.add.at(v, idx, 1.0)
            else:
                raise ValueError(f"fedkseed has no secure part {p.name!r}")
            out[p.name] = v
        return out

    def fork(self, model: nn.Module) -> nn.Module | None:
        """LoRA mode: own LoRA factors (perturbed in place by the SPSA steps), shared frozen base. Full mode:
        None (every weight is perturbed in place: a fork would be a whole second model)."""
        return fork_model(model) if self.lora else None

    def export_factors(self, model: nn.Module):
        """LoRA mode: the global adapter {module: (A, s·B)}; full mode: None (the result is the merged model)."""
        return adapter_factors(model, ADAPTER) if self.lora else None
