"""fedtune objects ⇄ Flower records, bit-exact.

TensorDict ⇄ ArrayRecord: one `Array` per tensor, in key order. dtypes numpy knows travel as Flower's
standard "numpy.ndarray" arrays (so a Flower strategy can read them with `to_torch_state_dict`); others
(bfloat16, …) as raw little-endian bytes with stype "fedtune.torch.raw".

Instruction ⇄ RecordDict and ClientUpdate ⇄ RecordDict:
  "fedtune"        ConfigRecord: scalar header fields; nested JSON-able dicts (train config, payload meta,
                   metrics) as JSON strings so any nesting survives
  "sync"           ArrayRecord: Instruction.sync.tensors
  "setup"          ArrayRecord: Instruction.setup.tensors (only when the instruction carries a setup)
  "update"         ArrayRecord: ClientUpdate.tensors
  "metrics"        MetricRecord: ClientUpdate.metrics (floats, for Flower-side tooling; the JSON copy in
                   "fedtune" is authoritative)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.algorithms.base import ClientUpdate, Instruction, Payload, TensorDict

RAW_STYPE = "fedtune.torch.raw"
NUMPY_STYPE = "numpy.ndarray"
_NUMPY_OK = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
             torch.uint8, torch.bool}


def tensor_to_array(t: torch.Tensor) -> Array:
    t = t.detach().cpu().contiguous()
    if t.dtype in _NUMPY_OK:
        return Array.from_numpy_ndarray(t.numpy())
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return Array(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), stype=RAW_STYPE, data=data)


def array_to_tensor(a: Array) -> torch.Tensor:
    if a.stype == RAW_STYPE:
        dtype = getattr(torch, a.dtype)
        flat = torch.frombuffer(bytearray(a.data), dtype=torch.uint8) if a.data else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(a.shape).clone()
    return torch.from_numpy(np.array(a.numpy(), copy=True, order="C"))  # np.ascontiguousarray would turn 0-d into 1-d


def tensors_to_record(td: TensorDict) -> ArrayRecord:
    rec = ArrayRecord()
    for k in sorted(td):
        rec[k] = tensor_to_array(td[k])
    return rec


def record_to_tensors(rec: ArrayRecord) -> TensorDict:
    return {k: array_to_tensor(a) for k, a in rec.items()}


def _json(x: Any) -> str:
    return json.dumps(x, sort_keys=True)


def instruction_to_record(ins: Instruction, *, from_version: int = -1, client_index: int = -1) -> RecordDict:
    """`from_version`: the version the server believes the client is at (the client checks it);
    `client_index`: the client's position in the run's roster (a node with its own data splits its
    train/eval examples with seed run.seed + index, as `fedtune simulate` does for client k)."""
    head = ConfigRecord({
        "round": int(ins.round), "client_id": ins.client_id, "base_version": int(ins.base_version),
        "from_version": int(from_version), "client_index": int(client_index), "train": _json(ins.train), "sync_meta": _json(ins.sync.meta),
        "has_setup": ins.setup is not None, "setup_meta": _json(ins.setup.meta if ins.setup else {}),
    })
    rd = RecordDict({"fedtune": head, "sync": tensors_to_record(ins.sync.tensors)})
    if ins.setup is not None:
        rd["setup"] = tensors_to_record(ins.setup.tensors)
    return rd


def record_to_instruction(rd: RecordDict) -> tuple[Instruction, int]:
    """(instruction, from_version)."""
    h = rd.config_records["fedtune"]
    setup = None
    if h["has_setup"]:
        setup = Payload(record_to_tensors(rd.array_records["setup"]), json.loads(str(h["setup_meta"])))
    ins = Instruction(
        round=int(h["round"]), client_id=str(h["client_id"]), base_version=int(h["base_version"]),
        train=json.loads(str(h["train"])),
        sync=Payload(record_to_tensors(rd.array_records["sync"]), json.loads(str(h["sync_meta"]))),
        setup=setup,
    )
    return ins, int(h["from_version"])


def record_client_index(rd: RecordDict) -> int:
    h = rd.config_records["fedtune"]
    return int(h["client_index"]) if "client_index" in h else -1


def update_to_record(u: ClientUpdate) -> RecordDict:
    head = ConfigRecord({"status": "ok", "client_id": u.client_id, "num_examples": int(u.num_examples),
                         "metrics": _json(u.metrics)})
    metrics = MetricRecord({k: float(v) for k, v in u.metrics.items() if isinstance(v, int | float)})
    return RecordDict({"fedtune": head, "update": tensors_to_record(u.tensors), "metrics": metrics})


def record_to_update(rd: RecordDict) -> ClientUpdate:
    h = rd.config_records["fedtune"]
    return ClientUpdate(client_id=str(h["client_id"]), num_examples=int(h["num_examples"]),
                        tensors=record_to_tensors(rd.array_records["update"]), metrics=json.loads(str(h["metrics"])))


def stale_record(client_id: str, have_version: int) -> RecordDict:
    """Reply of a client whose local model is not at the version the server assumed (see client.py)."""
    return RecordDict({"fedtune": ConfigRecord({"status": "stale", "client_id": client_id,
                                                "have_version": int(have_version)})})


def message_nbytes(msg: Message | RecordDict) -> int:
    """Flower's own serialized size: Σ deflated bytes over the object tree (unique objects, as Flower
    transfers each object id once)."""
    seen: dict[str, int] = {}

    def walk(obj) -> None:
        for oid, child in (obj.children or {}).items():
            if oid not in seen:
                seen[oid] = len(child.deflate())
                walk(child)

    root = msg
    seen[root.object_id] = len(root.deflate())
    walk(root)
    return sum(seen.values())
