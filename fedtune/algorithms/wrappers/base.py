"""The one delegating base of every wrapper: it holds the inner method and forwards the whole protocol to it;
a wrapper overrides only what it changes (robust aggregation: `aggregate`; client-level DP: `initialize` and
`aggregate`) and says what the wrapped method can still do (`capabilities`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedtune.algorithms.api import (
    Capabilities,
    ClientAlgorithm,
    ClientUpdate,
    FedAlgorithm,
    GlobalState,
    MetricRange,
    Part,
    Payload,
    UpdateSpec,
)
from fedtune.secagg.noise import NoiseParams


class Wrapper(FedAlgorithm):
    """`inner` with some of its protocol replaced; named "<inner>+<suffix>" (e.g. "fedavg+client_dp")."""

    suffix = "wrapped"

    def __init__(self, inner: FedAlgorithm) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.name = f"{inner.name}+{self.suffix}"  # type: ignore[misc] - per instance: the inner method's name

    @property
    def method(self) -> FedAlgorithm:
        """The innermost (registered) method."""
        inner = self.inner
        return inner.method if isinstance(inner, Wrapper) else inner

    # what the inner method declares
    @property
    def capabilities(self) -> Capabilities:
        """The inner method's, but a wrapped aggregate (noised, bounded, trimmed) is no longer its plain weighted
        mean: nothing wraps it again as a tensor average."""
        return dataclasses.replace(self.inner.capabilities, tensor_average=False)

    @property
    def state_format(self) -> int:  # type: ignore[override]
        return self.inner.state_format

    @property
    def metric_ranges(self) -> Mapping[str, MetricRange]:  # type: ignore[override]
        return self.inner.metric_ranges

    # the protocol, forwarded
    def holding_problem(self, quantization: str, dtype: str) -> str | None:
        return self.inner.holding_problem(quantization, dtype)

    def set_init_data(self, features: Sequence[dict[str, list[int]]], pad_id: int) -> None:
        self.inner.set_init_data(features, pad_id)

    def initialize(self, model: nn.Module, *, seed: int) -> GlobalState:
        return self.inner.initialize(model, seed=seed)

    def setup_payload(self, state: GlobalState) -> Payload:
        return self.inner.setup_payload(state)

    def sync_payload(self, state: GlobalState, from_version: int) -> Payload:
        return self.inner.sync_payload(state, from_version)

    def configure_round(self, rnd: int, state: GlobalState, client_ids: Sequence[str], base_train: dict[str, Any],
                        roster: Sequence[str]) -> dict[str, dict[str, Any]]:
        return self.inner.configure_round(rnd, state, client_ids, base_train, roster)

    def expected_update(self, state: GlobalState, train: dict[str, Any]) -> UpdateSpec:
        return self.inner.expected_update(state, train)

    def aggregate(self, rnd: int, state: GlobalState, updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict]:
        return self.inner.aggregate(rnd, state, updates)

    def make_client(self) -> ClientAlgorithm:
        return self.inner.make_client()

    @property
    def uniform_weights(self) -> bool:
        return self.inner.uniform_weights

    def secure_layout(self, state: GlobalState, train: dict[str, Any], clip: float) -> tuple[Part, ...]:
        return self.inner.secure_layout(state, train, clip)

    def secure_l2_clip(self) -> float:
        return self.inner.secure_l2_clip()

    def secure_noise(self, state: GlobalState) -> tuple[int, NoiseParams] | None:
        return self.inner.secure_noise(state)

    def apply_secure(self, rnd: int, state: GlobalState, parts: Mapping[str, torch.Tensor],
                     updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict[str, float]]:
        return self.inner.apply_secure(rnd, state, parts, updates)
