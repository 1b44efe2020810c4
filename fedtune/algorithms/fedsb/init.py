"""Initialisation of the shared frozen factors A (r×d_in) and B (d_out×r).

Data init (LoRA-SB): sum the full-weight gradients ∇W of every target module over a few batches, take
G = −sign(Σ∇W) ("sign", the direction of a first Adam step, as in the reference code) or G = −Σ∇W
("grad"), and a seeded randomized truncated SVD G ≈ U S Vᵀ: B = U_r, A = V_rᵀ. Only the subspaces are
used (R starts at 0, see the package docstring), so the step size η_eff and the sign of G do not matter.

Random init (no data): seeded Gaussian matrices orthonormalised by QR.

Both are computed on CPU in float32 with their own seeded RNG, so they are reproducible across devices
and leave the global RNG untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedtune.algorithms.fedsb.layer import Factors
from fedtune.models.hardware import model_device, to_device
from fedtune.training.loop import batches

OVERSAMPLE = 8  # extra columns for svd_lowrank: the rank-r part is much closer to the exact SVD


def _exact_weight(lin: nn.Module) -> bool:
    """A plain float32 nn.Parameter weight: its .grad is ∇W directly (any other: bfloat16, a bitsandbytes
    Params4bit/Int8Params, goes through `_GradOfWeight`)."""
    return type(lin.weight) is nn.Parameter and lin.weight.dtype == torch.float32


class _GradOfWeight:
    """∇W of a linear whose weight cannot hold a float32 gradient (quantized, or a low-precision float): the
    forward hook keeps the layer's input x and hooks its output y = x·Wᵀ(+b); in the backward
    ∇W += Σ_tokens ∂L/∂y ⊗ x, summed in float32 on the layer's device."""

    def __init__(self, lin: nn.Module) -> None:
        self.grad = torch.zeros(lin.out_features, lin.in_features, dtype=torch.float32, device=lin.weight.device)
        self.handle = lin.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].detach()
        if not output.requires_grad:  # nothing upstream requires grad (frozen base): make y a leaf that does
            output = output.detach().requires_grad_(True)

        def accumulate(g: torch.Tensor) -> None:
            self.grad += g.reshape(-1, g.shape[-1]).to(torch.float32).T @ x.reshape(-1, x.shape[-1]).to(torch.float32)

        output.register_hook(accumulate)
        return output


def full_weight_grads(
    model: nn.Module, linears: dict[str, nn.Linear], features: Sequence[dict], pad_id: int, *,
    n_batches: int, batch_size: int, seed: int,
) -> dict[str, torch.Tensor]:
    """{module: Σ_b ∇W L_b} (d_out×d_in, float32, CPU). requires_grad flags, .grad and train mode are restored.
    A float32 weight takes its gradient in .grad; any other (bfloat16, nf4, int8) through `_GradOfWeight`."""
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    was_training = model.training
    device = model_device(model)
    hooked: dict[str, _GradOfWeight] = {}
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name, lin in linears.items():
            if _exact_weight(lin):
                lin.weight.requires_grad_(True)
            else:
                hooked[name] = _GradOfWeight(lin)
        model.eval()  # no dropout: the init must not depend on the global RNG
        stream = batches(features, batch_size, seed, pad_id)
        for _ in range(n_batches):
            model(**to_device(next(stream), device)).loss.backward()
        return {n: (hooked[n].grad if n in hooked else lin.weight.grad).detach().to("cpu", torch.float32).clone()
                for n, lin in linears.items()}
    finally:
        for h in hooked.values():
            h.handle.remove()
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


def svd_factors(grads: dict[str, torch.Tensor], rank: int, *, mode: str, seed: int, niter: int) -> Factors:
    """{module: (A = V_rᵀ, B = U_r)} of G = −sign(∇W) or −∇W; A has orthonormal rows, B orthonormal columns."""
    out: Factors = {}
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws its test matrix from the global CPU RNG
        torch.manual_seed(seed)
        for name in sorted(grads):
            g = -(torch.sign(grads[name]) if mode == "sign" else grads[name])  # d_out×d_in
            q = min(rank + OVERSAMPLE, *g.shape)
            u, _, v = torch.svd_lowrank(g, q=q, niter=niter)  # u: d_out×q, v: d_in×q
            out[name] = (v[:, :rank].T.contiguous(), u[:, :rank].contiguous())
    return out


def random_factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> Factors:
    """{module: (A r×d_in, B d_out×r)} with orthonormal rows/columns from a seeded Gaussian (QR)."""
    g = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for name in sorted(shapes):
        d_out, d_in = shapes[name]
        qa, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=g))  # d_in×r
        qb, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=g))  # d_out×r
        out[name] = (qa.T.contiguous(), qb.contiguous())
    return out
