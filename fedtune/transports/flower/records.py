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

import io
import json
import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.algorithms.api import ClientUpdate, Instruction, Payload, TensorDict

RAW_STYPE = "fedtune.torch.raw"
NUMPY_STYPE = "numpy.ndarray"
_NUMPY_OK = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
             torch.uint8, torch.bool}
# what a received Array may hold (hostile input: anything else is refused before a byte is allocated)
_NUMPY_DTYPES = {np.dtype(torch.empty(0, dtype=d).numpy().dtype).newbyteorder("<").str: d for d in _NUMPY_OK}
_RAW_DTYPES = {str(d).removeprefix("torch."): d for d in (*_NUMPY_OK, torch.bfloat16)}
MAX_NPY_HEADER = 10_000
INT64_MAX = 2**63 - 1  # numpy's own default limit


def tensor_to_array(t: torch.Tensor) -> Array:
    t = t.detach().cpu().contiguous()
    if t.dtype in _NUMPY_OK:
        return Array.from_numpy_ndarray(t.numpy())
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return Array(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), stype=RAW_STYPE, data=data)


def _checked_shape(shape, dtype: torch.dtype, nbytes: int, what: str) -> tuple[int, ...]:
    shape = tuple(shape)
    if any(not isinstance(d, int) or d < 0 for d in shape) or math.prod(shape) * dtype.itemsize != nbytes:
        raise ValueError(f"{what}: shape {shape[:8]} of {dtype} does not match its {nbytes} data bytes")
    return shape


def array_to_tensor(a: Array) -> torch.Tensor:
    """The tensor an Array carries. Arrays come from other organisations: only the dtypes fedtune sends are
    accepted, and the declared shape must match the data length (checked before anything is allocated:
    np.load would allocate a hostile header's declared shape first); ValueError otherwise."""
    if a.stype == RAW_STYPE:
        dtype = _RAW_DTYPES.get(a.dtype)
        if dtype is None:
            raise ValueError(f"raw array of unsupported dtype {str(a.dtype)[:40]!r}")
        shape = _checked_shape(a.shape, dtype, len(a.data), "raw array")
        flat = torch.frombuffer(bytearray(a.data), dtype=torch.uint8) if a.data else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(shape).clone()
    if a.stype != NUMPY_STYPE:
        raise ValueError(f"array of unsupported stype {str(a.stype)[:40]!r}")
    f = io.BytesIO(a.data)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(
        np.lib.format.read_magic(f))
    if read is None:
        raise ValueError("numpy array: unsupported .npy format version")
    shape, fortran, np_dtype = read(f, max_header_size=MAX_NPY_HEADER)
    dtype = _NUMPY_DTYPES.get(np_dtype.str if np_dtype.itemsize > 1 else np_dtype.newbyteorder("<").str)
    if dtype is None:
        raise ValueError(f"numpy array of unsupported dtype {np_dtype.str[:40]!r}")
    shape = _checked_shape(shape, dtype, len(a.data) - f.tell(), "numpy array")
    arr = np.frombuffer(a.data, dtype=np_dtype, offset=f.tell()).reshape(shape, order="F" if fortran else "C")
    return torch.from_numpy(np.array(arr, copy=True, order="C"))  # np.ascontiguousarray would turn 0-d into 1-d


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


def header_int(h: ConfigRecord, key: str, lo: int, hi: int = INT64_MAX) -> int:
    """An integer field of a received header, in [lo, hi] (ValueError otherwise: a float such as 1e400 = inf,
    a bool or a string is refused, not converted)."""
    v = h[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{key} must be an integer in [{lo}, {hi}], got {str(v)[:40]!r}")
    return v


def record_to_update(rd: RecordDict) -> ClientUpdate:
    h = rd.config_records["fedtune"]
    return ClientUpdate(client_id=str(h["client_id"]), num_examples=header_int(h, "num_examples", 0),
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
