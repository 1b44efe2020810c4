"""What FLoRA's server and clients share: the cumulative ΔW's keys and its one update rule."""

from __future__ import annotations

import torch

from fedtune.algorithms.api import TensorDict

CUM = "cum/"


def round_key(version: int, name: str) -> str:
    return f"v{version:05d}/{name}"


def version_of(key: str) -> int | None:
    return int(key[1:6]) if key.startswith("v") and key[6:7] == "/" else None


def add_to_cumulative(cum: TensorDict, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """cum ← cum + b·a for one module (a: R×d_in, b: d_out×R). Replaces entries, never edits a tensor in
    place (the server's previous state stays intact). Factors while the rank stays < min(d_in, d_out),
    dense float64 from then on."""
    ka, kb, kd = f"{CUM}{module}.A", f"{CUM}{module}.B", f"{CUM}{module}.D"
    if kd in cum:
        cum[kd] = cum[kd] + b.double() @ a.double()
        return
    if ka in cum:
        a, b = torch.cat([cum[ka], a], 0), torch.cat([cum[kb], b], 1)
    else:  # own storage: the round's stack may sit beside it in the same state (safetensors refuses aliases)
        a, b = a.clone(), b.clone()
    if a.shape[0] < min(a.shape[1], b.shape[0]):
        cum[ka], cum[kb] = a, b
    else:
        cum.pop(ka, None)
        cum.pop(kb, None)
        cum[kd] = b.double() @ a.double()


def cumulative_delta(cum: TensorDict, module: str) -> tuple[torch.Tensor, int] | None:
    """(ΔW float64, its rank bound min(R, d_in, d_out)) of one module, or None before the first merge."""
    if f"{CUM}{module}.D" in cum:
        d = cum[f"{CUM}{module}.D"]
        return d, min(d.shape)
    if f"{CUM}{module}.A" in cum:
        a, b = cum[f"{CUM}{module}.A"], cum[f"{CUM}{module}.B"]
        return b.double() @ a.double(), a.shape[0]
    return None
