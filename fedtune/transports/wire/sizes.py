"""Exact serialized sizes (Σ protobuf ByteSize of the chunk messages) of instructions and updates, so every
transport reports bytes_up/bytes_down the same way; the in-process simulation uses these without a network."""

from __future__ import annotations

from fedtune.algorithms.api import ClientUpdate, Instruction
from fedtune.transports.wire.framing import wire_bytes
from fedtune.transports.wire.streams import instruction_to_wire, update_to_wire

TASK_ID_LEN = 32  # task ids are uuid4 hex strings


def instruction_bytes(ins: Instruction) -> int:
    return wire_bytes(instruction_to_wire(ins, "0" * TASK_ID_LEN))


def update_bytes(update: ClientUpdate) -> int:
    return wire_bytes(update_to_wire(update, "0" * TASK_ID_LEN))
