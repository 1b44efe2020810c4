"""FedAvg of LoRA factors — the FedIT baseline (Zhang et al., 2024, "Towards Building the Federatedgpt:
Federated Instruction Tuning"; McMahan et al., 2017 for FedAvg).

    A_g = Σ_k p_k A_k,   B_g = Σ_k p_k B_k,   p_k = n_k / Σ_j n_j

Inexact: Σ p_k B_k A_k ≠ B_g A_g. The gap ‖Σ p_k B_k A_k − B_g A_g‖_F (summed over modules, absolute and
relative to ‖Σ p_k B_k A_k‖_F) is reported as a metric. All clients use the same rank.
"""

from fedtune.algorithms.fedavg.client import LoRAClient
from fedtune.algorithms.fedavg.config import FedAvgConfig
from fedtune.algorithms.fedavg.server import FedAvg
from fedtune.algorithms.registry import register

register(FedAvg)

__all__ = ["FedAvg", "FedAvgConfig", "LoRAClient"]
