"""The two streams: an Instruction as PullTask chunks and a ClientUpdate as PushUpdate chunks, each way.

Streams:
  PullTask   → one WAIT or FINISHED message, or TASK chunks 0..total-1. Chunk 0 carries a
               TaskHeader (round, client_id, base_version, JSON train config, JSON meta of the sync
               and setup payloads, total_bytes, sha256). Blob = safetensors with tensor names
               "sync/<name>" and "setup/<name>".
  PushUpdate → UpdateChunk 0..total-1, each with task_id, total, total_bytes; chunk 0 also carries
               client_id, num_examples, metrics; the LAST chunk carries the sha256 of the whole blob
               (the sender hashes while it streams; an earlier chunk may repeat it, and every copy
               must agree). Blob = safetensors of ClientUpdate.tensors, or for a small update (raw
               payload ≤ COMPACT_MAX_BYTES) a compact record: chunk 0 lists the tensors (RawTensor: name,
               dtype enum, shape; a few bytes each) and the blob is their raw bytes back to back, with no
               safetensors header (8 B + its JSON, padded: 136 B on a 1,600 B FedKSeed upload).
Senders (`update_to_wire`, `instruction_to_wire`) build each serialized chunk straight from the
tensors' memory (one copy per byte, no whole-blob buffer). Receivers check the declared total
against `max_bytes` (and a compact record's tensor list against the declared total) before buffering
anything, then order, consistency and running size per chunk; they hash each chunk as it arrives into
one buffer of the declared size and compare the sha256 before the blob is unpacked (safetensors tensors
are views of that buffer). Failures raise the WireError family; `status_code` maps them to gRPC codes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from fedtune.algorithms.api import ClientUpdate, Instruction, Payload, TensorDict, UpdateSpec, payload_nbytes
from fedtune.transports.wire import fedtune_pb2 as pb2
from fedtune.transports.wire.checks import (
    WireError,
    WireLimitError,
    WirePermissionError,
    WireUnknownTaskError,
    check_id,
    safe_str,
)
from fedtune.transports.wire.framing import CHUNK_BYTES, Assembler, chunk_runs, parse_chunk, with_data
from fedtune.transports.wire.tensors import (
    blob_size,
    dumps_json,
    loads_json_object,
    pack_parts,
    raw_pack,
    raw_unpack,
    unpack,
)

MAX_HEADER_BYTES = 1 << 20  # serialized TaskHeader (JSON train config + payload metas)
COMPACT_MAX_BYTES = 64 << 10  # updates with at most this many raw tensor bytes travel as a compact record
MAX_RAW_TENSORS = 1 << 16  # tensors in one compact record
MAX_RAW_DIMS = 16
_RAW_DTYPES = {
    torch.float32: pb2.RawTensor.F32, torch.float64: pb2.RawTensor.F64, torch.float16: pb2.RawTensor.F16,
    torch.bfloat16: pb2.RawTensor.BF16, torch.int64: pb2.RawTensor.I64, torch.int32: pb2.RawTensor.I32,
    torch.int16: pb2.RawTensor.I16, torch.int8: pb2.RawTensor.I8, torch.uint8: pb2.RawTensor.U8,
    torch.bool: pb2.RawTensor.BOOL,
}
_RAW_TORCH = {v: k for k, v in _RAW_DTYPES.items()}

# --- PullTask -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    task_id: str
    instruction: Instruction


@dataclass(frozen=True)
class Wait:
    retry_after_s: float
    reason: str = ""


@dataclass(frozen=True)
class Finished:
    reason: str = ""


def wait_chunks(retry_after_s: float, reason: str = "") -> Iterator[pb2.TaskChunk]:
    """PullTask response: no task yet, ask again after `retry_after_s`."""
    yield pb2.TaskChunk(kind=pb2.TaskChunk.WAIT, retry_after_s=retry_after_s, message=reason)


def finished_chunks(reason: str = "") -> Iterator[pb2.TaskChunk]:
    """PullTask response: the run is over."""
    yield pb2.TaskChunk(kind=pb2.TaskChunk.FINISHED, message=reason)


def instruction_to_wire(instr: Instruction, task_id: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Instruction → serialized TASK chunks (chunk 0 carries the header, so the blob is hashed before it).
    Lazy: one chunk in memory at a time, built from the tensors' memory (which must not change meanwhile)."""
    check_id(task_id, "task_id")
    tensors: TensorDict = {f"sync/{k}": v for k, v in instr.sync.tensors.items()}
    if instr.setup is not None:
        tensors.update({f"setup/{k}": v for k, v in instr.setup.tensors.items()})
    parts = pack_parts(tensors)
    size, total, runs = chunk_runs(parts, chunk_bytes)
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    header = pb2.TaskHeader(
        round=instr.round,
        client_id=instr.client_id,
        base_version=instr.base_version,
        train_json=dumps_json(instr.train, "Instruction.train"),
        sync_meta_json=dumps_json(instr.sync.meta, "sync Payload.meta"),
        has_setup=instr.setup is not None,
        setup_meta_json=dumps_json(instr.setup.meta, "setup Payload.meta") if instr.setup is not None else "",
        total_bytes=size,
        sha256=digest.digest(),
    )
    if header.ByteSize() > MAX_HEADER_BYTES:
        raise WireLimitError(
            f"task header is {header.ByteSize()} bytes; limit {MAX_HEADER_BYTES} (move meta into tensors)"
        )
    for i, run in enumerate(runs):
        msg = pb2.TaskChunk(kind=pb2.TaskChunk.TASK, task_id=task_id, index=i, total=total,
                            header=header if i == 0 else None)
        yield with_data(msg, run)


def instruction_to_chunks(instr: Instruction, task_id: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb2.TaskChunk]:
    """`instruction_to_wire` as protobuf messages."""
    return map(pb2.TaskChunk.FromString, instruction_to_wire(instr, task_id, chunk_bytes))


def _instruction(h: pb2.TaskHeader, blob: memoryview) -> Instruction:
    sync = Payload(meta=loads_json_object(h.sync_meta_json, "sync meta"))
    setup = Payload(meta=loads_json_object(h.setup_meta_json, "setup meta")) if h.has_setup else None
    for name, t in unpack(blob).items():
        prefix, _, key = name.partition("/")
        if prefix == "sync" and key:
            sync.tensors[key] = t
        elif prefix == "setup" and key and setup is not None:
            setup.tensors[key] = t
        else:
            raise WireError(f"task blob: unexpected tensor name {name!r}")
    train = loads_json_object(h.train_json, "train config")
    return Instruction(h.round, h.client_id, h.base_version, train, sync, setup)


def read_task(chunks: Iterable[pb2.TaskChunk | bytes], *, max_bytes: int) -> Task | Wait | Finished:
    """Consume a PullTask response stream (messages or their serialized bytes)."""
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        raise WireError("PullTask: empty response stream")
    first, data = parse_chunk(pb2.TaskChunk, first)
    if first.kind in (pb2.TaskChunk.WAIT, pb2.TaskChunk.FINISHED):
        if next(it, None) is not None:
            raise WireError("PullTask: messages after a WAIT/FINISHED reply")
        if first.kind == pb2.TaskChunk.FINISHED:
            return Finished(first.message)
        if not math.isfinite(first.retry_after_s) or first.retry_after_s < 0:
            raise WireError(f"PullTask: invalid retry_after_s {first.retry_after_s}")
        return Wait(first.retry_after_s, first.message)
    if first.kind != pb2.TaskChunk.TASK:
        raise WireError(f"PullTask: unknown message kind {first.kind}")
    if not first.HasField("header"):
        raise WireError("PullTask: chunk 0 lacks the task header")
    h = first.header
    asm = Assembler("task", check_id(first.task_id, "task_id"), first.total, h.total_bytes, h.sha256, max_bytes)
    if not asm.sha256:
        raise WireError("PullTask: the task header lacks the sha256")
    chunk: pb2.TaskChunk | None = first
    while chunk is not None:
        if chunk is not first and (chunk.kind != pb2.TaskChunk.TASK or chunk.HasField("header")):
            raise WireError(f"PullTask: chunk {chunk.index} must be a TASK chunk without header")
        asm.add(chunk.task_id, chunk.index, chunk.total, data)
        nxt = next(it, None)
        chunk, data = (None, b"") if nxt is None else parse_chunk(pb2.TaskChunk, nxt)
    return Task(asm.task_id, _instruction(h, asm.finish()))


def chunks_to_instruction(chunks: Iterable[pb2.TaskChunk | bytes], *, max_bytes: int) -> Instruction:
    """Like `read_task`, but the stream must be a task (WireError on WAIT/FINISHED)."""
    result = read_task(chunks, max_bytes=max_bytes)
    if not isinstance(result, Task):
        raise WireError(f"PullTask: expected a task, got {result}")
    return result.instruction


# --- PushUpdate -----------------------------------------------------------------------------


def _compact(tensors: TensorDict) -> list[pb2.RawTensor] | None:
    """The compact record's tensor list for a small update (sorted by name), or None: use safetensors."""
    if not all(isinstance(t, torch.Tensor) and t.dtype in _RAW_DTYPES for t in tensors.values()):
        return None  # safetensors reports what is wrong, or carries a dtype the record does not list
    if not 0 < payload_nbytes(tensors) <= COMPACT_MAX_BYTES:
        return None
    return [pb2.RawTensor(name=k, dtype=_RAW_DTYPES[tensors[k].dtype], shape=tensors[k].shape) for k in sorted(tensors)]


def _raw_layout(records: Sequence[pb2.RawTensor], total_bytes: int) -> list[tuple[str, torch.dtype, tuple, int]]:
    """Check a compact record's tensor list (hostile input) against the declared blob size, before any data."""
    if len(records) > MAX_RAW_TENSORS:
        raise WireLimitError(f"PushUpdate: compact record lists {len(records)} tensors; limit {MAX_RAW_TENSORS}")
    layout, names = [], set()
    for r in records:
        if not r.name or len(r.name) > 1024 or r.name in names:
            raise WireError(f"PushUpdate: compact record: empty, too long or duplicate tensor name {safe_str(r.name)}")
        if r.dtype not in _RAW_TORCH:
            raise WireError(f"PushUpdate: compact record: tensor {safe_str(r.name)} has unknown dtype {r.dtype}")
        if len(r.shape) > MAX_RAW_DIMS or any(d >= 2**48 for d in r.shape):
            raise WireError(f"PushUpdate: compact record: tensor {safe_str(r.name)} has {len(r.shape)} dimensions "
                            f"or one ≥ 2^48")
        dtype, shape = _RAW_TORCH[r.dtype], tuple(r.shape)
        names.add(r.name)
        layout.append((r.name, dtype, shape, math.prod(shape) * dtype.itemsize))
    if sum(n for *_, n in layout) != total_bytes:
        raise WireError(f"PushUpdate: compact record: its tensors take {sum(n for *_, n in layout)} bytes, the "
                        f"stream declares {total_bytes}")
    return layout


def max_update_blob_bytes(spec: UpdateSpec) -> int:
    """The blob size an honest sender of an update matching `spec` declares (safetensors: `update_to_wire`
    never makes a larger one; a compact record is smaller). A receiver refuses more at chunk 0."""
    return blob_size({k: (tuple(t.shape), t.dtype) for k, t in spec.tensors.items()})


def update_to_wire(
    update: ClientUpdate, task_id: str, chunk_bytes: int = CHUNK_BYTES, *, compact: bool = True
) -> Iterator[bytes]:
    """ClientUpdate → serialized UpdateChunks (chunk 0 carries client_id, num_examples, metrics, and for a small
    update the compact record's tensor list; the last one the sha256, hashed chunk by chunk as they go out). Lazy:
    one chunk in memory at a time, built from the tensors' memory (which must not change meanwhile). compact=False:
    always safetensors (what every update was before the compact record; benchmarks compare the two). Send with
    `CoordinatorStub.PushUpdate`."""
    check_id(task_id, "task_id")
    if update.num_examples < 0:
        raise WireError(f"num_examples must be >= 0, got {update.num_examples}")
    raw = _compact(update.tensors) if compact else None
    parts = pack_parts(update.tensors) if raw is None else [raw_pack({r.name: update.tensors[r.name] for r in raw})]
    size, total, runs = chunk_runs(parts, chunk_bytes)
    digest = hashlib.sha256()
    for i, run in enumerate(runs):
        for piece in run:
            digest.update(piece)
        msg = pb2.UpdateChunk(task_id=task_id, index=i, total=total, total_bytes=size)
        if i == total - 1:
            msg.sha256 = digest.digest()
        if i == 0:
            msg.client_id = update.client_id
            msg.num_examples = update.num_examples
            msg.metrics.update({k: float(v) for k, v in update.metrics.items()})
            if raw is not None:
                msg.raw_tensors.extend(raw)
        yield with_data(msg, run)


def update_to_chunks(
    update: ClientUpdate, task_id: str, chunk_bytes: int = CHUNK_BYTES, *, compact: bool = True
) -> Iterator[pb2.UpdateChunk]:
    """`update_to_wire` as protobuf messages."""
    return map(pb2.UpdateChunk.FromString, update_to_wire(update, task_id, chunk_bytes, compact=compact))


def read_update(
    chunks: Iterable[pb2.UpdateChunk | bytes],
    *,
    max_bytes: int,
    expected_task_id: str | Collection[str] | None = None,
    expected_client_id: str | None = None,
    reserve: Callable[[int], None] | None = None,
) -> tuple[str, ClientUpdate]:
    """Consume a PushUpdate request stream → (task_id, update).

    `expected_task_id` (one id or a collection of acceptable ids) and `expected_client_id` (the
    authenticated client) are checked on chunk 0, before any data is buffered
    (WirePermissionError). `reserve(total_bytes)` is called once chunk 0 passed its checks, before
    its data is buffered (a receiver's memory budget; it may raise to refuse the stream)."""
    it = iter(chunks)
    raw = next(it, None)
    if raw is None:
        raise WireError("PushUpdate: empty request stream")
    first, data = parse_chunk(pb2.UpdateChunk, raw)
    task_id = check_id(first.task_id, "task_id")
    if expected_client_id is not None and first.client_id != expected_client_id:
        raise WirePermissionError(
            f"PushUpdate: update names client {safe_str(first.client_id)}, caller is {expected_client_id!r}"
        )
    if expected_task_id is not None:
        ok = task_id == expected_task_id if isinstance(expected_task_id, str) else task_id in expected_task_id
        if not ok:
            raise WireUnknownTaskError(f"PushUpdate: task {safe_str(task_id)} is not an open task of this client",
                                       task_id)
    if first.num_examples < 0:
        raise WireError(f"PushUpdate: num_examples must be >= 0, got {first.num_examples}")
    asm = Assembler("update", task_id, first.total, first.total_bytes, first.sha256, max_bytes)
    layout = _raw_layout(first.raw_tensors, asm.total_bytes) if first.raw_tensors else None
    if reserve is not None:
        reserve(asm.total_bytes)
    chunk: pb2.UpdateChunk | None = first
    while chunk is not None:
        if chunk.total_bytes != asm.total_bytes:
            raise WireError(f"PushUpdate: chunk {chunk.index} total_bytes inconsistent with chunk 0")
        if chunk is not first and chunk.raw_tensors:
            raise WireError(f"PushUpdate: chunk {chunk.index} lists raw_tensors (chunk 0 only)")
        asm.add(chunk.task_id, chunk.index, chunk.total, data, chunk.sha256)
        nxt = next(it, None)
        chunk, data = (None, b"") if nxt is None else parse_chunk(pb2.UpdateChunk, nxt)
    blob = asm.finish()
    tensors = unpack(blob) if layout is None else raw_unpack(blob, layout)
    return task_id, ClientUpdate(first.client_id, first.num_examples, tensors, dict(first.metrics))


def chunks_to_update(
    chunks: Iterable[pb2.UpdateChunk | bytes],
    *,
    max_bytes: int,
    expected_task_id: str | Collection[str] | None = None,
    expected_client_id: str | None = None,
) -> ClientUpdate:
    """Like `read_update`, returning only the update."""
    return read_update(
        chunks, max_bytes=max_bytes, expected_task_id=expected_task_id, expected_client_id=expected_client_id
    )[1]
