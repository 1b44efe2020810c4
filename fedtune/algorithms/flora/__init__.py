"""FLoRA — stacking-based federated LoRA with heterogeneous ranks (Wang et al., 2024, "FLoRA: Federated
Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations").

Client k trains a fresh LoRA of rank r_k (scale s_k = α_k / r_k) on the current base W. Server, per module:

    A_stack = [p_1·A_1; …; p_K·A_K]            (Σr_k × d_in)
    B_stack = [s_1·B_1, …, s_K·B_K]            (d_out × Σr_k)
    ΔW = B_stack · A_stack = Σ_k p_k s_k B_k A_k     (exact)

Every client merges W ← W + ΔW and starts the next round with a fresh LoRA (A random, B = 0). The stacked
factors of every round are kept (they are small), so a client that missed rounds replays the merges it lacks
in order and every copy of the base stays bit-identical (checked by fingerprint). The exported adapter
stacks all rounds: rank Σ_rounds Σ_k r_k, scale 1, exact.
"""

from fedtune.algorithms.flora.client import FLoRAClient
from fedtune.algorithms.flora.config import FLoRAConfig
from fedtune.algorithms.flora.server import FLoRA

__all__ = ["FLoRA", "FLoRAClient", "FLoRAConfig"]
