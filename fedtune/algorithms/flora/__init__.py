"""FLoRA — stacking-based federated LoRA with heterogeneous ranks (Wang et al., 2024, "FLoRA: Federated
Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations").

Client k trains a fresh LoRA of rank r_k (scale s_k = α_k / r_k) on the current base W. Server, per module:

    A_stack = [p_1·A_1; …; p_K·A_K]            (Σr_k × d_in)
    B_stack = [s_1·B_1, …, s_K·B_K]            (d_out × Σr_k)
    ΔW = B_stack · A_stack = Σ_k p_k s_k B_k A_k     (exact)

Every client merges W ← W + ΔW and starts the next round with a fresh LoRA (A random, B = 0). Server and
clients keep the cumulative ΔW_total = Σ_rounds B_stack·A_stack per module in a bounded exact form (stacked
factors while Σr < min(d_in, d_out), then dense float64) and every copy sets W = W₀ + ΔW_total (summed in
float64, rounded once), so all copies of the base stay bit-identical (checked by fingerprint) whichever way
they caught up: the stacks of the last few rounds (`keep_rounds`) for a client slightly behind, the
cumulative ΔW for any other (whichever is fewer bytes). The exported adapter is the SVD of ΔW_total,
rank ≤ min(Σ r, d_in, d_out), scale 1, exact (or truncated to `export_rank`, relative error reported).
"""

from fedtune.algorithms.flora.client import FLoRAClient
from fedtune.algorithms.flora.config import FLoRAConfig
from fedtune.algorithms.flora.server import FLoRA
from fedtune.algorithms.registry import register

register(FLoRA, default=True)  # what a run config without [run] algorithm runs

__all__ = ["FLoRA", "FLoRAClient", "FLoRAConfig"]
