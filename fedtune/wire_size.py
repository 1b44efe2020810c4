"""Serialized sizes of instructions and updates, for byte accounting in the in-process transport."""

from __future__ import annotations

import json

from safetensors.torch import save

from fedtune.algorithms.base import ClientUpdate, Instruction, Payload


def _blob(p: Payload) -> int:
    tensors = {k: v.contiguous() for k, v in p.tensors.items()}
    return len(save(tensors, metadata={"meta": json.dumps(p.meta, sort_keys=True)}))


def instruction_bytes(ins: Instruction) -> int:
    header = json.dumps({"round": ins.round, "client": ins.client_id, "v": ins.base_version, "train": ins.train})
    return len(header) + _blob(ins.sync) + (_blob(ins.setup) if ins.setup is not None else 0)


def update_bytes(u: ClientUpdate) -> int:
    return _blob(Payload(u.tensors, {"n": u.num_examples, "metrics": u.metrics}))
