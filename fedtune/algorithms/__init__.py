"""Federated methods: the extension point (api), the registry, the client step every transport runs (runner), code
shared by methods (common/), one package per method, and wrappers (robust aggregation, client-level DP)."""

from __future__ import annotations

from fedtune.algorithms.api import (
    Capabilities,
    ClientAlgorithm,
    ClientUpdate,
    FedAlgorithm,
    GlobalState,
    Instruction,
    Payload,
    TensorDict,
    TrainContext,
)
from fedtune.algorithms.registry import available, config_class, default_method, get_algorithm, method, register

__all__ = [
    "Capabilities", "ClientAlgorithm", "ClientUpdate", "FedAlgorithm", "GlobalState", "Instruction", "Payload",
    "TensorDict", "TrainContext", "available", "config_class", "default_method", "get_algorithm", "method", "register",
]
