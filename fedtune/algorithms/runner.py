"""One copy of the global model, and the client step every transport runs on it.

A `Node` holds a base model, the method's client side once it is set up, and the global version its model is at
(-1: not set up). The client step, the same for the gRPC agent, the Flower ClientApp and the in-process
simulation:

    apply(instruction)   check it (InstructionRejected: the coordinator is another organisation), set up once
                         (the method named by the setup payload), sync to the instruction's global version
    train(data, config)  the method's local training from the synced model; the update with its metrics, the
                         process's peak memory among them

The server keeps one too (`Node.for_server`): the global model it evaluates, advanced straight from the state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from fedtune.algorithms.api import (
    ClientAlgorithm,
    ClientUpdate,
    FedAlgorithm,
    GlobalState,
    Instruction,
    InstructionRejected,
    Payload,
    TrainContext,
    validate_instruction,
)
from fedtune.algorithms.registry import get_algorithm, method
from fedtune.models.hardware import Placement, model_device, placement
from fedtune.models.memory import peak_memory_mb
from fedtune.training.evaluate import evaluate


def check_instruction(ins: Instruction, current: str | None, *, client_id: str | None = None,
                      vet: Callable[[Instruction], None] | None = None) -> str:
    """InstructionRejected unless `ins` is a valid task for `client_id` of its setup's method (else `current`, the
    method the node is set up with); returns that method's name. `vet`: the caller's own checks, last."""
    name = str(ins.setup.meta.get("algorithm", current) if ins.setup is not None else current)
    try:
        cls = method(name)
    except ValueError:
        raise InstructionRejected(f"the task's method {name[:40]!r} is not one this client knows") from None
    validate_instruction(ins, cls.accepts())
    if client_id is not None and ins.client_id != client_id:
        raise InstructionRejected(f"the task is for {str(ins.client_id)[:40]!r}, not this client")
    if vet is not None:
        vet(ins)
    return name


class Node:
    def __init__(self, base: nn.Module, holding: Placement | None = None) -> None:
        self.base = base
        self.holding = holding or placement(base)  # how the base is held (the loader's; else read off the model)
        self.model: nn.Module | None = None  # the base as the method set it up (e.g. wrapped by peft)
        self.client: ClientAlgorithm | None = None
        self.method: str | None = None
        self.version = -1

    @classmethod
    def for_server(cls, base: nn.Module, algo: FedAlgorithm, state: GlobalState, holding: Placement | None = None,
                   ) -> Node:
        """The server's copy of the global model at `state` (set up from the method itself, no instruction)."""
        node = cls(base, holding)
        node.setup(algo.make_client(), algo.setup_payload(state))
        node.catch_up(algo, state)
        return node

    def catch_up(self, algo: FedAlgorithm, state: GlobalState) -> None:
        """Server side: bring the model to `state` (nothing to do when it is there)."""
        if self.version != state.version:
            self.advance(algo.sync_payload(state, self.version), state.version)

    def setup(self, client: ClientAlgorithm, payload: Payload, state: dict[str, Any] | None = None) -> None:
        """Set the base up for `client` (once); `state`: client state to restore (DP accountants)."""
        self.client = client
        self.model = client.setup(self.base, payload, self.holding)
        if state:
            client.load_state_dict(state)
        self.method = payload.meta.get("algorithm", self.method)
        self.version = -1

    def replay(self, setup: Payload, syncs: Sequence[Payload], version: int, state: dict[str, Any]) -> None:
        """Rebuild the model from payloads this node applied before (its own record of them): set up, sync each
        in order, restore the client state; the model is then at `version`."""
        self.setup(get_algorithm(str(setup.meta.get("algorithm", self.method))).make_client(), setup, state)
        for payload in syncs:
            self.client.sync(self.model, payload)
        self.version = version

    def advance(self, payload: Payload, version: int) -> None:
        """Apply a sync payload that brings the model to global `version`."""
        if self.client is None or self.model is None:
            raise RuntimeError("sync before setup: this node has no method set up")
        self.client.sync(self.model, payload)
        self.version = version

    def apply(self, ins: Instruction, *, client_id: str | None = None,
              vet: Callable[[Instruction], None] | None = None,
              state: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """Check the instruction (InstructionRejected), set up when it carries a setup (restoring `state()`, the
        client's saved state, if given), sync. `client_id`: this node's client; a task for another is refused.
        `vet`: the caller's own checks of a valid instruction (raise to refuse it), before anything changes."""
        if ins.setup is None and self.client is None:
            raise InstructionRejected("a task without setup for a client that is not set up")
        name = check_instruction(ins, self.method, client_id=client_id, vet=vet)
        if ins.setup is not None:
            self.setup(get_algorithm(name).make_client(), ins.setup, state() if state is not None else None)
        self.advance(ins.sync, ins.base_version)

    def train(self, features: Sequence[dict], pad_id: int, config: dict[str, Any], *, client_id: str,
              model: nn.Module | None = None, on_step: Callable[[int, float], None] | None = None) -> ClientUpdate:
        """The method's local training of `client_id` on `features` from the synced model (or `model`, a fork of
        it); the update's metrics include this process's peak memory."""
        model = self.model if model is None else model
        update = self.client.train(model, TrainContext(client_id, features, pad_id, on_step), config)
        update.metrics.update(peak_memory_mb(model_device(model)))
        return update

    def evaluate(self, features: Sequence[dict], *, pad_id: int, batch_size: int = 16) -> float:
        return evaluate(self.model, features, pad_id=pad_id, batch_size=batch_size)

    def loss_of(self, algo: FedAlgorithm, features: Sequence[dict], *, pad_id: int,
                batch_size: int = 16) -> Callable[[GlobalState], float]:
        """Server side: state ↦ the loss on `features` of the model caught up to that state (an eval/test hook)."""
        def loss(state: GlobalState) -> float:
            self.catch_up(algo, state)
            return self.evaluate(features, pad_id=pad_id, batch_size=batch_size)

        return loss

    def generation_of(self, algo: FedAlgorithm, features: Sequence[dict], tok, *, max_examples: int
                      ) -> Callable[[GlobalState], dict[str, Any]]:
        """Server side: state ↦ Rouge-L / exact match of the caught-up model's greedy generations on `features`."""
        from fedtune.training.genmetrics import generation_metrics

        def gen(state: GlobalState) -> dict[str, Any]:
            self.catch_up(algo, state)
            return generation_metrics(self.model, tok, features, max_examples=max_examples)

        return gen
