"""FedProx — FedAvg with a proximal term in each client's local objective (Li, Sahu, Zaheer, Sanjabi, Talwalkar,
Smith, MLSys 2020, "Federated Optimization in Heterogeneous Networks").

Client k minimises, from the global adapter w_g of the round,

    h_k(w) = F_k(w) + (μ/2) · ‖w − w_g‖²        over its trainable LoRA factors w (A and B)

so each step's gradient gains μ (w − w_g): local training is pulled toward the global model, which bounds how far
non-IID clients drift apart. The frozen base does not move, so the term over every weight equals the term over the
factors. The server is FedAvg's (A_g = Σ_k p_k A_k, B_g = Σ_k p_k B_k, p_k = n_k / Σ_j n_j); μ travels in the round's
train config (`mu`). μ = 0 is FedAvg, bit for bit.

The term enters as its exact gradient through a step hook of the one training loop (fedtune.training.loop), after
the step's data gradient is final — clipped to max_grad_norm, and under sample-level DP clipped per example and
noised — and before the AdamW update: μ (w − w_g) is data-independent, so adding it after the noise leaves the DP
guarantee unchanged (as a loss term it would be dropped: opacus builds the gradient from per-example gradients only).
The reported train_loss is F_k, the data loss, comparable with FedAvg's.
"""

from fedtune.algorithms.fedprox.client import FedProxClient, proximal
from fedtune.algorithms.fedprox.config import FedProxConfig
from fedtune.algorithms.fedprox.server import FedProx
from fedtune.algorithms.registry import register

register(FedProx)

__all__ = ["FedProx", "FedProxClient", "FedProxConfig", "proximal"]
