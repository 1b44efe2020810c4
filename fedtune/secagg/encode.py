"""Fixed-point encoding of a client's vector into the ring Z_{2^b}, and of the ring sum back to a mean.

    x (float, each coordinate clipped to ±c)  →  q = ⌊s·x + U⌋, U ~ U[0, 1)   (stochastic rounding: E q = s·x, |q − s·x| < 1)
    y = w·q mod 2^b                           (w: the client's public integer weight; 1 for an unweighted part)

Read as a signed b-bit integer, Σ_u y_u is exact as long as T·(s·c + 1) ≤ 2^(b−1) − 1, T = Σ w over the clients that
advertised keys (a superset of those whose vectors are summed): `scales` picks s = (⌊(2^(b−1) − 1)/T⌋ − 2)/c (integer
headroom, so float rounding of s·x cannot reach the edge), capped at 2^50/c so that s·x and its fractional part are
exact in float64 and the rounding stays unbiased; no sum can wrap. The decoded weighted mean Σ_u w_u q_u / (s·Σ_u w_u)
differs from the plain Σ_u w_u x_u / Σ_u w_u by less than 1/s per coordinate (an unweighted sum: by less than n/s);
`error_bound` states it. Integer parts (counts) travel with s = 1 and are exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MAX_FLOAT_SCALE = 2.0**50
BITS = (32, 64)


class EncodingError(ValueError):
    """A configuration whose sums could wrap the ring, a vector that does not fit the layout, or a decoded sum out of
    the range honest clients can produce."""


@dataclass(frozen=True)
class Part:
    """One named block of the summed vector: its shape, the per-coordinate bound |x| ≤ clip the client clamps to,
    whether it is multiplied by the client's weight (a weighted mean) or summed as is, and whether it holds exact
    integers (counts; s = 1)."""

    name: str
    shape: tuple[int, ...]
    clip: float
    weighted: bool = True
    integer: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "clip": self.clip, "weighted": self.weighted,
                "integer": self.integer}

    @classmethod
    def from_dict(cls, d: Mapping) -> Part:
        if not isinstance(d, Mapping) or set(d) != {"name", "shape", "clip", "weighted", "integer"}:
            raise EncodingError("a layout part needs exactly name, shape, clip, weighted, integer")
        name, shape, clip = d["name"], d["shape"], d["clip"]
        if not (isinstance(name, str) and 0 < len(name) <= 200 and isinstance(shape, list) and len(shape) <= 8
                and all(type(n) is int and 0 <= n <= 2**31 for n in shape)
                and isinstance(clip, int | float) and not isinstance(clip, bool) and 0 < clip < math.inf
                and isinstance(d["weighted"], bool) and isinstance(d["integer"], bool)):
            raise EncodingError(f"a layout part is malformed: {str(d)[:120]}")
        return cls(name, tuple(shape), float(clip), d["weighted"], d["integer"])


Layout = tuple[Part, ...]


def capped_counts(counts: Mapping[str, int], cap: float) -> dict[str, int]:
    """Example counts rewritten so that no client's weight n_k / Σ n exceeds `cap` (0 < cap < 1): the heavy clients
    get weight `cap` each (rounded down) and the others keep their proportions (water-filling). Counts are
    self-reported; this bounds what one claim can buy. Unchanged when no weight exceeds the cap, or when the cap
    cannot be met (fewer than 1/cap clients)."""
    out = dict(counts)
    if not 0 < cap < 1 or len(out) * cap < 1:
        return out
    heavy: set[str] = set()
    while True:
        light = sum(n for c, n in out.items() if c not in heavy)
        share = 1.0 - cap * len(heavy)
        new = {c for c, n in out.items() if c not in heavy and n > cap / share * light * (1 + 1e-12)}
        if not new:
            break
        heavy |= new
        if cap * len(heavy) >= 1:  # every client at the cap: equal weights
            return dict.fromkeys(out, 1)
    light = sum(n for c, n in out.items() if c not in heavy)
    each = max(1, math.floor(cap * light / (1.0 - cap * len(heavy)))) if heavy else 0
    return {c: (each if c in heavy else n) for c, n in out.items()}


def ring_dtype(bits: int) -> np.dtype:
    if bits not in BITS:
        raise EncodingError(f"the ring has 32 or 64 bits, not {bits!r}")
    return np.dtype(np.uint32 if bits == 32 else np.uint64)


def length(layout: Layout) -> int:
    """m: the number of ring elements a masked vector holds."""
    return sum(p.size for p in layout)


def scales(layout: Layout, bits: int, total_weight: int, n_clients: int) -> list[float]:
    """The scale s of each part so that no sum over these clients can wrap (EncodingError when a part does not fit:
    the message says what to change)."""
    ring_dtype(bits)
    lim = 2 ** (bits - 1) - 1
    out = []
    for p in layout:
        total = total_weight if p.weighted else n_clients
        if p.integer:
            if total * math.floor(p.clip) > lim:
                raise EncodingError(f"secagg: part {p.name} sums {total} × {p.clip:g} > 2^{bits - 1}; use bits = 64")
            out.append(1.0)
            continue
        s = min((lim // total - 2) / p.clip, MAX_FLOAT_SCALE / p.clip)
        if s < 1:
            raise EncodingError(f"secagg: a {bits}-bit ring cannot hold {total} × clip {p.clip:g} for {p.name} "
                                "with any precision; use bits = 64 or a smaller clip")
        out.append(s)
    return out


def error_bound(layout: Layout, part_scales: Sequence[float], n_clients: int) -> float:
    """Worst-case |secure − plain| per coordinate of the decoded result: 1/s for a weighted mean, n/s for a sum."""
    errs = [(1.0 if p.weighted else n_clients) / s for p, s in zip(layout, part_scales, strict=True) if not p.integer]
    return max(errs, default=0.0)


def clipped_parts(parts: Mapping[str, np.ndarray], layout: Layout) -> tuple[list[np.ndarray], int]:
    """The layout's parts as flat float64 arrays, each coordinate clipped to its part's bound, and how many were
    clipped (EncodingError: a missing or extra part, a wrong shape, NaN/inf)."""
    if set(parts) != {p.name for p in layout}:
        raise EncodingError(f"secagg: the vector has parts {sorted(parts)[:4]}, the layout {[p.name for p in layout][:4]}")
    out, clipped = [], 0
    for p in layout:
        x = np.asarray(parts[p.name], dtype=np.float64)
        if tuple(x.shape) != p.shape:
            raise EncodingError(f"secagg: part {p.name} has shape {tuple(x.shape)}, the layout says {p.shape}")
        x = x.reshape(-1)
        if not np.isfinite(x).all():
            raise EncodingError(f"secagg: part {p.name} holds NaN/inf; refusing to encode it")
        c = math.floor(p.clip) if p.integer else p.clip
        clipped += int((np.abs(x) > c).sum())
        out.append(np.clip(x, -c, c))
    return out, clipped


def encode(parts: Mapping[str, np.ndarray], layout: Layout, part_scales: Sequence[float], weight: int, bits: int,
           rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(y in the ring [m], how many coordinates were clipped). `parts`: float arrays of the layout's names/shapes."""
    dt = ring_dtype(bits)
    xs, clipped = clipped_parts(parts, layout)
    out = []
    for p, s, x in zip(layout, part_scales, xs, strict=True):
        if p.integer:
            q = np.rint(x).astype(np.int64)
        else:  # |s·x| ≤ 2^50: s·x − ⌊s·x⌋ is exact, so P(round up) is exactly the fractional part
            sx = x * s
            fl = np.floor(sx)
            q = (fl + (rng.random(sx.shape) < sx - fl)).astype(np.int64)
        if p.weighted:
            q *= int(weight)
        out.append(q)
    q = np.concatenate(out) if out else np.zeros(0, np.int64)
    return q.astype(dt), clipped  # two's complement: int64 → uint64 wraps; → uint32 keeps the low 32 bits


def ring_to_wire(y: np.ndarray) -> np.ndarray:
    """A masked vector in the ring (uint32/uint64) as the signed int32/int64 it travels as: a view, no copy."""
    return y.view(np.int32 if y.dtype == np.uint32 else np.int64)


def wire_to_ring(a: np.ndarray) -> np.ndarray:
    """A received int32/int64 masked vector (its dtype already checked) as the ring's uint32/uint64: a view."""
    return a.view(np.uint32 if a.dtype == np.int32 else np.uint64)


def signed(z: np.ndarray, bits: int) -> np.ndarray:
    """A ring vector as signed int64 (two's complement of b bits)."""
    if bits == 64:
        return z.astype(np.uint64).view(np.int64)
    v = z.astype(np.int64)
    return np.where(v >= 2**31, v - 2**32, v)


def decode(z: np.ndarray, layout: Layout, part_scales: Sequence[float], *, total_weight: int, n_clients: int,
           bits: int, max_weight_total: int, noise_tail: float = 0.0) -> dict[str, np.ndarray]:
    """Σ_u y_u (unmasked, [m]) → {name: weighted mean (or sum) float64 of the part's shape}. `total_weight`: Σ w
    of the summed clients; `max_weight_total`: the T the scales were chosen for; `noise_tail`: how far distributed
    DP's summed noise may reach (fedtune.secagg.noise.tail). EncodingError when a coordinate is outside what honest
    clients can produce (a garbage or wrapped contribution; it cannot tell which client)."""
    v, out, i = signed(z, bits), {}, 0
    for p, s in zip(layout, part_scales, strict=True):
        block = v[i:i + p.size]
        i += p.size
        total = max_weight_total if p.weighted else n_clients
        lim = int(total * (math.floor(p.clip) if p.integer else s * p.clip + 1) + noise_tail)  # exact: -2^63 caught
        if block.size and (int(block.max()) > lim or int(block.min()) < -lim):
            worst = max(int(block.max()), -int(block.min()))
            raise EncodingError(f"secagg: the decoded sum of {p.name} reaches {worst:.3g}, more than honest clients "
                                f"can send ({lim:.3g}): a client sent an out-of-range vector")
        x = block.astype(np.float64) / s
        if p.weighted:
            x /= total_weight
        out[p.name] = x.reshape(p.shape)
    if i != z.size:
        raise EncodingError(f"secagg: the sum has {z.size} elements, the layout {i}")
    return out
