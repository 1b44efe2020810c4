"""A local copy of the global model, and the client step every transport runs on it."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fedtune.algorithms.api import ClientAlgorithm, FedAlgorithm, GlobalState
from fedtune.training.local import evaluate


class GlobalModel:
    """A local model kept at the global version (for evaluation; in simulation also the shared base)."""

    def __init__(self, model: nn.Module, client: ClientAlgorithm, *, algo: FedAlgorithm, state: GlobalState) -> None:
        self.client = client
        self.model = client.setup(model, algo.setup_payload(state))
        self.version = -1
        self.advance(algo, state)

    def advance(self, algo: FedAlgorithm, state: GlobalState) -> None:
        if self.version != state.version:
            self.client.sync(self.model, algo.sync_payload(state, self.version))
            self.version = state.version

    def evaluate(self, features: Sequence[dict], *, pad_id: int, batch_size: int = 16) -> float:
        return evaluate(self.model, features, pad_id=pad_id, batch_size=batch_size)
