"""The contract between the round engine and a transport: what a transport is handed for one attempt at a round
(`RoundPlan`), and what it hands back (`RoundResult`). A transport moves instructions to clients and their updates
back; it never aggregates, and it knows no method: whatever it must ask about the round (a client's instruction
for the version it reports, whether an update is what its client was assigned) it asks the plan."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedtune.algorithms.api import ClientUpdate, Instruction, Payload, UpdateSpec
from fedtune.secagg.protocol import RoundParams, SecureSum


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
    # how each client holds its base, as far as the transport knows (gRPC: what it declared at Join)
    client_hardware: dict[str, dict[str, Any]] = field(default_factory=dict)
    # secure aggregation (plan.secagg): the decoded sum, or why the attempt aborted; `unmasked`: unmask requests
    # went out (the round must then commit or the run stop). `updates` then hold the summed clients' metadata only.
    secure: SecureSum | None = None
    secagg_abort: str = ""
    unmasked: bool = False
    reasons: dict[str, str] = field(default_factory=dict)  # rejected client → why (the round's metrics say it)
    late: list[str] = field(default_factory=list)  # clients whose update for an earlier round came in during this one
    weight_capped: list[str] = field(default_factory=list)  # clients whose example count was capped this round


@dataclass(frozen=True)
class RoundPlan:
    """One attempt at one round, as the engine hands it to a transport."""

    round: int
    version: int  # the global version the instructions bring a client to
    instructions: dict[str, Instruction]  # one per sampled client, for the version the engine last knew it at
    versions: dict[str, int]  # that version per sampled client (-1: never set up)
    min_clients: int
    roster: Sequence[str]
    # (client, the global version it reports) → its instruction rebuilt from there (ValueError: a version newer
    # than the server's)
    instruction_for: Callable[[str, int], Instruction]
    # (client, update, max_examples=None): UpdateRejected unless the update is what the client was assigned
    check_update: Callable[..., None]
    expected_update: Callable[[str], UpdateSpec]  # what a client must send (UpdateRejected: not sampled)
    sync_payload: Callable[[int], Payload]  # brings a copy of the global model at that version to `version`
    # secure aggregation: this attempt's parameters (in every instruction's train["secagg"]); `secagg_require`: the
    # attempt must sum exactly these clients (a round resumed after an unmask), else abort before unmasking;
    # `on_unmask(survivors)` is called (and must have journaled them) before any unmask request goes out
    secagg: RoundParams | None = None
    secagg_require: frozenset[str] | None = None
    on_unmask: Callable[[list[str]], None] | None = None

    def index(self, cid: str) -> int:
        """The client's place in the run's roster (its data partition), -1 when it is not in it."""
        return list(self.roster).index(cid) if cid in self.roster else -1


class Transport(Protocol):
    def run_round(self, plan: RoundPlan, timeout_s: float) -> RoundResult: ...
