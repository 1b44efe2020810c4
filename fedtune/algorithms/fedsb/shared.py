"""What Fed-SB's server and clients share: how the R matrices are packed."""

from __future__ import annotations

from fedtune.algorithms.api import TensorDict

R_KEY = "R"  # all R matrices packed [n_modules, r, r], sorted module-name order (one tensor: one header on the wire)


def modules_of(tensors: TensorDict) -> list[str]:
    """The adapted modules in packing order: the sorted names of the A factors (known to every client)."""
    return sorted(k[:-2] for k in tensors if k.endswith(".A"))
