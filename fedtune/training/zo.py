"""Zeroth-order (SPSA / MeZO-style) primitives with seed-regenerated noise.

z(seed) ~ N(0, I) over the trainable tensors in sorted-name order, seen as one flat vector cut into blocks of
L = min(CHUNK, total size) elements (blocks span tensor boundaries; the last block is cut short). Block b is
`torch.randn(L, generator=torch.Generator().manual_seed(block_seed(seed, b)))` on the CPU (CPU and CUDA normal
streams differ, so the CPU stream is the definition; z is moved to the parameter's device and dtype
afterwards). Blocks are independent streams, so a regeneration runs on torch.get_num_threads() worker threads
(mt19937 is sequential: one stream would use one core while the forwards use all), each with one block buffer:
at most threads × L floats of z exist at a time, a ZO step needs about the memory of inference. z is never
stored: every use regenerates it from the seed (keeping it between the passes would be a second θ).

    g_i = (L_i(θ + εz) − L_i(θ − εz)) / 2ε  (per-example projected gradient, a scalar; L_i = mean token loss
                                             of example i, from the same two forwards over the batch)
    g = (1/B) Σ_i g_i                        (the step's projected gradient; DP clips each g_i first)
    θ ← θ − η·g·z                            (apply_update with coeff = η·g)

Every change of θ is θ ← θ + (scale·z): the product is rounded on its own, in float32 on the CPU, before the
block is moved to the parameter's device, and then added (one IEEE add, no fused multiply-add whose rounding
depends on the device or the kernel), so replaying the same (seed, coeff) pairs gives the same bits on the CPU
and on CUDA.

Precision (`keep_master_weights`): memory = float32 θ, compute = the base's dtype. On a bfloat16/float16 base,
θ + εz − εz does not give back θ (ε·z = 5e-4·z is a few bf16 ulps of a weight, and an update η·g·z ≈ 1e-6·z
is below half an ulp: it vanishes), so the trainable weights are upcast to float32 master weights once and the
forwards run under torch.autocast(device, <base dtype>): the matmuls stay in bf16, the perturbations and
updates accumulate in fp32, and the end-of-round restore is bit-exact. A 4-bit/8-bit base cannot be trained
in place at all (its weights are quantized codes); LoRA factors are float32 on any base and need no upcast.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from torch.nn import functional as F

from fedtune.data.format import IGNORE
from fedtune.models.hardware import model_device, to_device

CHUNK = 1 << 20  # elements of a z block (4 MiB fp32); changing it changes z(seed)
_M64 = (1 << 64) - 1
HALF = (torch.bfloat16, torch.float16)

NamedParams = Sequence[tuple[str, torch.Tensor]]


def zo_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters in the fixed z order (sorted names; tied weights appear once)."""
    params = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda x: x[0])
    if not params:
        raise ValueError("the model has no trainable parameters for zeroth-order training")
    return params


def _raw(p: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor of any dtype (bfloat16 has no numpy type), shared (no copy)."""
    return memoryview(p.detach().reshape(-1).view(torch.uint8).numpy())


def keep_master_weights(model: nn.Module, compute_dtype: torch.dtype) -> torch.dtype | None:
    """Full-parameter ZO on a half-precision base: every floating tensor of the model to float32 (in place: the
    master weights the perturbations and updates accumulate in); returns the dtype the ZO forwards then run in
    (pass it to `example_losses` / `spsa_example_grads`), None for a float32 `compute_dtype` (nothing changes)."""
    if compute_dtype not in HALF:
        return None
    model.float()
    return compute_dtype


def autocast(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` on the model's device (None: no autocast)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=dtype)


class ParamBackup:
    """Bit-exact snapshot of the trainable parameters for the end-of-round restore.

    The parameters go to an unlinked temporary file (TMPDIR): CPU parameters are written and read back in
    place, no second copy of θ in the process's memory, so a full-parameter client round peaks at inference
    memory (the bytes sit in the OS page cache, which can be evicted); a GPU parameter (or a non-contiguous
    one) goes through a CPU copy of itself, one parameter at a time, so no second θ on the GPU either. Without a
    usable TMPDIR (or spill=False) the backup is an in-memory clone. Any dtype (raw bytes). Reversing the in-place
    steps instead is not exact in fp32: x + u − u ≠ x whenever the sum lost low bits of x (measured on a tiny
    Llama: 6.7 % of the weights differ after one step undone, 31 % after 50, by up to 4.5e5 ulps near 0)."""

    def __init__(self, params: NamedParams, *, spill: bool = True) -> None:
        self.params, self.file, self.copy = list(params), None, None
        if spill:
            try:
                self.file = tempfile.TemporaryFile(prefix="fedtune-zo-", buffering=0)  # noqa: SIM115 - close()
                for _, p in self.params:
                    buf = _raw(p if _in_place(p) else p.detach().cpu().contiguous())
                    done = 0
                    while done < len(buf):
                        done += self.file.write(buf[done:])
                return
            except OSError:  # no writable TMPDIR or disk full: fall back to memory
                self.close()
        self.copy = [p.detach().clone() for _, p in self.params]

    @torch.no_grad()
    def restore(self) -> None:
        if self.copy is not None:
            for (_, p), b in zip(self.params, self.copy):
                p.copy_(b)
            return
        self.file.seek(0)
        for name, p in self.params:
            tmp = p if _in_place(p) else torch.empty(p.shape, dtype=p.dtype)
            buf = _raw(tmp)
            done = 0
            while done < len(buf):
                n = self.file.readinto(buf[done:])
                if not n:
                    raise OSError(f"parameter backup truncated at {name}")
                done += n
            if tmp is not p:
                p.copy_(tmp)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = self.copy = None


def _in_place(p: torch.Tensor) -> bool:
    """Whether the backup can read and write p's own bytes (a contiguous CPU tensor)."""
    return p.device.type == "cpu" and p.is_contiguous()


def block_seed(seed: int, block: int) -> int:
    """The generator seed of z(seed)'s block `block`: splitmix64 of (seed, block), so neighbouring seeds and
    blocks get unrelated streams (torch's mt19937 keeps the low 32 bits of it)."""
    x = (int(seed) + (block + 1) * 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def block_generator(seed: int, block: int) -> torch.Generator:
    """The CPU generator of one block (one call per block per regeneration: tests count them)."""
    return torch.Generator(device="cpu").manual_seed(block_seed(seed, block))


def layout(params: NamedParams) -> tuple[int, list[list[tuple[torch.Tensor, int, int]]]]:
    """(L, blocks): for each block of z the [(flat view of a param slice, start, end in the block)] it covers."""
    total = sum(p.numel() for _, p in params)
    size = max(1, min(CHUNK, total))
    blocks: list[list[tuple[torch.Tensor, int, int]]] = [[] for _ in range(-(-total // size))]
    pos = 0
    for _, p in params:
        flat = p.view(-1)  # params are contiguous; view shares storage so in-place updates hit p
        done = 0
        while done < flat.numel():
            b, off = divmod(pos, size)
            n = min(size - off, flat.numel() - done)
            blocks[b].append((flat[done : done + n], off, off + n))
            done, pos = done + n, pos + n
    return size, blocks


def _fill(buf: torch.Tensor, seed: int, block: int) -> torch.Tensor:
    # normal_ on the whole L-element buffer: a shorter draw is not a prefix of a longer one in torch
    return buf.normal_(generator=block_generator(seed, block))


def noise(params: NamedParams, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (flat view of a param slice, its z on the param's device/dtype), block by block, in z order."""
    size, blocks = layout(params)
    buf = torch.empty(size, dtype=torch.float32)
    for b, pieces in enumerate(blocks):
        _fill(buf, seed, b)
        for part, lo, hi in pieces:
            yield part, buf[lo:hi].to(part.device, part.dtype, copy=True)


@torch.no_grad()
def perturb(params: NamedParams, seed: int, scale: float) -> None:
    """θ ← θ + scale·z(seed), in place: one regeneration of z, its blocks on torch.get_num_threads() threads
    (each block adds into disjoint slices of θ, so the result does not depend on the thread count). scale·z is
    rounded to float32 on the CPU first, then moved and added: the same bits on any device."""
    size, blocks = layout(params)

    @torch.no_grad()  # grad mode is per thread: workers need their own
    def run(ids: range) -> None:
        buf = torch.empty(size, dtype=torch.float32)
        for b in ids:
            _fill(buf, seed, b)
            for part, lo, hi in blocks[b]:  # the slices of a block are disjoint: scaling them in place is safe
                part.add_(buf[lo:hi].mul_(scale).to(part.device, part.dtype))

    workers = min(torch.get_num_threads(), len(blocks))
    if workers <= 1:
        run(range(len(blocks)))
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="fedtune-zo") as pool:
        list(pool.map(run, [range(w, len(blocks), workers) for w in range(workers)]))  # list(): re-raise


@torch.no_grad()
def apply_update(params: NamedParams, seed: int, coeff: float) -> None:
    """θ ← θ − coeff·z(seed) (coeff = η·g for one step, η·H[s] for a replayed aggregate)."""
    perturb(params, seed, -coeff)


@torch.no_grad()
def materialize(params: NamedParams, seed: int) -> list[torch.Tensor]:
    """z(seed) as full tensors shaped like the params — for tests and debugging only (whole-model memory)."""
    zs = [(n, torch.zeros_like(p)) for n, p in params]
    perturb(zs, seed, 1.0)  # 0 + 1·z is z exactly
    return [z for _, z in zs]


def example_losses(model: nn.Module, batch: dict[str, torch.Tensor], compute_dtype: torch.dtype | None = None,
                   ) -> torch.Tensor:
    """(B,) mean next-token loss of each example over its labels != -100 (labels are shifted, not the logits:
    no copy of the (B, T, V) logits beyond the loss's own, as in HF's causal-LM loss), on the model's device
    (the batch is moved there); the forward under autocast to `compute_dtype` (see keep_master_weights), the loss
    in float32."""
    batch = to_device(batch, model_device(model))
    with autocast(model, compute_dtype):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)  # (B, T): target of position t is token t+1
    tok = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return tok.view(labels.shape).sum(1) / (labels != IGNORE).sum(1).clamp(min=1)


@torch.no_grad()
def spsa_example_grads(
    model: nn.Module, params: NamedParams, parts: Sequence[dict[str, torch.Tensor]], seed: int, eps: float,
    *, restore: bool = True, compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example (g_i float64, L_i(θ+εz), L_i(θ−εz)), CPU tensors, over the micro-batches `parts` (one forward
    per part and sign). Perturbs +εz, −2εz, then +εz if `restore` (θ back up to fp32 rounding, not bit-exact); with
    restore=False θ is left at θ − εz for the caller to fuse the restore with its update (`finish_step`).
    No parts: no forward, no perturbation, empty tensors."""
    if not parts:
        empty = torch.zeros(0)
        return empty.double(), empty, empty
    perturb(params, seed, eps)
    plus = torch.cat([example_losses(model, b, compute_dtype).cpu() for b in parts])
    perturb(params, seed, -2.0 * eps)
    minus = torch.cat([example_losses(model, b, compute_dtype).cpu() for b in parts])
    if restore:
        perturb(params, seed, eps)
    return (plus.double() - minus.double()) / (2.0 * eps), plus, minus


@torch.no_grad()
def finish_step(params: NamedParams, seed: int, displaced: float, coeff: float) -> None:
    """From θ + displaced·z (displaced = −ε after spsa_example_grads(restore=False), 0 without forwards) to
    θ − coeff·z in ONE z regeneration: a ZO step costs 3 regenerations (+εz, −2εz, (ε − η·g)·z) instead of 4."""
    perturb(params, seed, -displaced - coeff)


def mean_grad(g: torch.Tensor) -> float:
    """The step's g = (1/B) Σ_i g_i (the DP step with σ = 0, C = ∞ computes exactly this)."""
    return float(g.sum()) / g.numel()


@torch.no_grad()
def spsa_step(
    model: nn.Module, params: NamedParams, batch: dict[str, torch.Tensor], seed: int, eps: float
) -> tuple[float, float, float]:
    """(g, mean_i L_i(θ+εz), mean_i L_i(θ−εz)) on one batch."""
    g, plus, minus = spsa_example_grads(model, params, [batch], seed, eps)
    return mean_grad(g), float(plus.mean()), float(minus.mean())
