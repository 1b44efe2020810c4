"""What FedKSeed's server and clients share: the candidate seed set and the state's keys."""

from __future__ import annotations

import torch

ABS_SUM, COUNT, PROBS = "pro/abs_sum", "pro/count", "seed_probs"
MAX_SEEDS = 2**31 - 1  # FedKSeedConfig's bound on K, also checked on the client


def round_key(version: int, name: str) -> str:
    return f"v{version:05d}/{name}"


def candidate_seeds(num_seeds: int, run_seed: int) -> torch.Tensor:
    """K distinct seeds drawn once from the run seed. int64 [K]."""
    g = torch.Generator().manual_seed(run_seed)
    seeds = torch.randint(0, 2**62, (num_seeds,), generator=g, dtype=torch.int64)
    if seeds.unique().numel() != num_seeds:  # ~K²/2^63 chance; fail loudly rather than bias sampling
        raise RuntimeError(f"duplicate candidate seeds for run seed {run_seed}; use another seed")
    return seeds
