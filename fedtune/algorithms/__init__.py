"""Algorithm registry. A new method = one package + one `register(...)` line below."""

from __future__ import annotations

import importlib
from typing import Any

from fedtune.algorithms.api import (
    ClientAlgorithm,
    ClientUpdate,
    FedAlgorithm,
    GlobalState,
    Instruction,
    Payload,
    TensorDict,
    TrainContext,
)

# name -> "module:AlgorithmClass:ConfigClass" (imported lazily so optional deps stay optional)
_REGISTRY: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Register `target` = "package.module:AlgorithmClass:ConfigClass" under `name`."""
    _REGISTRY[name] = target


register("fedavg", "fedtune.algorithms.fedavg:FedAvg:FedAvgConfig")
register("flora", "fedtune.algorithms.flora:FLoRA:FLoRAConfig")
register("fedsb", "fedtune.algorithms.fedsb:FedSB:FedSBConfig")
register("fedkseed", "fedtune.algorithms.fedkseed:FedKSeed:FedKSeedConfig")


def available() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(name: str) -> tuple[type[FedAlgorithm], type]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {', '.join(available())}")
    module, cls, cfg = _REGISTRY[name].split(":")
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, cfg)


def config_class(name: str) -> type:
    return _resolve(name)[1]


def get_algorithm(name: str, config: Any | None = None) -> FedAlgorithm:
    """Instantiate algorithm `name` with its config dataclass (default config when None)."""
    algo_cls, cfg_cls = _resolve(name)
    return algo_cls(config if config is not None else cfg_cls())


__all__ = [
    "ClientAlgorithm", "ClientUpdate", "FedAlgorithm", "GlobalState", "Instruction", "Payload",
    "TensorDict", "TrainContext", "available", "config_class", "get_algorithm", "register",
]
