"""The contract between the round engine and a transport: what a transport is handed for a round, and what it
hands back. A transport moves instructions to clients and their updates back; it never aggregates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fedtune.algorithms.api import ClientUpdate, Instruction


@dataclass
class RoundResult:
    updates: list[ClientUpdate]
    failed: list[str] = field(default_factory=list)
    bytes_up: int = 0  # serialized, what crossed the transport
    bytes_down: int = 0
    payload_bytes_up: int = 0  # raw tensor bytes, Σ numel·itemsize
    payload_bytes_down: int = 0
    budget_exhausted: list[str] = field(default_factory=list)  # clients whose DP budget is spent
    rejected: list[str] = field(default_factory=list)  # clients whose update failed validation


class Transport(Protocol):
    def run_round(self, rnd: int, instructions: dict[str, Instruction], timeout_s: float) -> RoundResult: ...
