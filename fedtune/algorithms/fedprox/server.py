"""FedProx server side: FedAvg's aggregate; each client's train config carries μ (see package docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fedtune.algorithms.api import Bound, GlobalState
from fedtune.algorithms.fedavg import FedAvg
from fedtune.algorithms.fedprox.client import FedProxClient
from fedtune.algorithms.fedprox.config import FedProxConfig


class FedProx(FedAvg):
    name = "fedprox"
    config_class = FedProxConfig
    CAPABILITIES = dataclasses.replace(FedAvg.CAPABILITIES, baseline=False)  # FedAvg's, but FedAvg is the baseline
    train_fields: ClassVar[Mapping[str, Bound]] = {"mu": Bound("float", 0.0, 1e6)}
    config: FedProxConfig

    def configure_round(self, rnd: int, state: GlobalState, client_ids: Sequence[str], base_train: dict[str, Any],
                        roster: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {cid: dict(train, mu=float(self.config.mu))
                for cid, train in super().configure_round(rnd, state, client_ids, base_train, roster).items()}

    def make_client(self) -> FedProxClient:
        return FedProxClient()
