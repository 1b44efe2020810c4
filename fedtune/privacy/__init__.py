"""Differential privacy for federated fine-tuning ([privacy] in a run config).

mode = "sample": DP-SGD inside each client (opacus: Poisson sampling, per-example clipping to
    max_grad_norm, Gaussian noise) on the trainable parameters only. Protects each individual training
    example of a client against anyone who sees that client's updates (server, other clients, the final
    model). ε is per client, tracked by the client's own accountant (`SampleLevelDP`).
    FedKSeed (zeroth-order) clips each example's projected-gradient scalar to [−C, C] and noises the step's
    sum instead: the same mechanism and accountant on one scalar per step.
mode = "client": DP-FedAvg at the server (fedtune.algorithms.wrappers.client_dp.ClientLevelDP): each client's
    whole update is clipped to clip_norm and Gaussian noise is added to the sum. Protects the participation of a
    whole client (an organisation's entire dataset) in the released global model, assuming a trusted server.
mode = "none": no protection.

Accounting always uses opacus' accountants (RDP or PRV) through `Accountant`.
"""

from fedtune.privacy.accounting import Accountant, noise_for_target
from fedtune.privacy.config import PrivacyConfig
from fedtune.privacy.sample import (
    DPRound,
    PrivacyBudgetExhausted,
    SampleLevelDP,
    clip_scalars,
    dp_training,
    per_example_loss,
    poisson_batches,
    private_scalar_mean,
    private_train_local,
)

__all__ = [
    "Accountant", "DPRound", "PrivacyBudgetExhausted", "PrivacyConfig", "SampleLevelDP",
    "clip_scalars", "dp_training", "noise_for_target", "per_example_loss", "poisson_batches",
    "private_scalar_mean", "private_train_local",
]
