"""Domain objects ⇄ protobuf messages of fedtune.v1 (protos/fedtune/v1/fedtune.proto).

The ONLY module that imports the generated `_pb2` code: the coordinator and the edge agent use
the dataclasses and functions here, plus the re-exported `CoordinatorStub`,
`CoordinatorServicer` and `add_servicer`.

Streams:
  PullTask   → one WAIT or FINISHED message, or TASK chunks 0..total-1. Chunk 0 carries a
               TaskHeader (round, client_id, base_version, JSON train config, JSON meta of the sync
               and setup payloads, total_bytes, sha256). Blob = safetensors with tensor names
               "sync/<name>" and "setup/<name>".
  PushUpdate → UpdateChunk 0..total-1, each with task_id, total, total_bytes, sha256 of the whole
               blob; chunk 0 also carries client_id, num_examples, metrics. Blob = safetensors of
               ClientUpdate.tensors, or for a small update (raw payload ≤ COMPACT_MAX_BYTES) a compact
               record: chunk 0 lists the tensors (RawTensor: name, dtype enum, shape; a few bytes each)
               and the blob is their raw bytes back to back, with no safetensors header (8 B + its JSON,
               padded: 136 B on a 1,600 B FedKSeed upload).
Receivers check the declared total against `max_bytes` before buffering anything, then order,
consistency, running size and sha256. Failures raise the WireError family; `status_code` maps
them to gRPC codes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError, Message

from fedtune.algorithms.base import ClientUpdate, Instruction, Payload, TensorDict, payload_nbytes
from fedtune.wire import fedtune_pb2 as pb2
from fedtune.wire import fedtune_pb2_grpc as pb2_grpc
from fedtune.wire.tensors import (
    WireError,
    WireIntegrityError,
    WireLimitError,
    dumps_json,
    loads_json_object,
    pack,
    raw_pack,
    raw_unpack,
    unpack,
)

CHUNK_BYTES = 1 << 20  # data bytes per chunk
MAX_HEADER_BYTES = 1 << 20  # serialized TaskHeader (JSON train config + payload metas)
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20  # gRPC message limit: header + chunk + slack
MAX_ID_CHARS = 256
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

CoordinatorStub = pb2_grpc.CoordinatorStub
CoordinatorServicer = pb2_grpc.CoordinatorServicer
SERVICE_NAME = "fedtune.v1.Coordinator"  # for the health service / reflection


class WirePermissionError(WireError):
    """The stream is well-formed but not this client's to send (gRPC: PERMISSION_DENIED)."""


def add_servicer(server: grpc.Server, servicer: CoordinatorServicer) -> None:
    """Register a Coordinator servicer on a grpc.Server.

    Requests arrive as raw bytes and are parsed here, not by grpc: a malformed unary request becomes
    INVALID_ARGUMENT from our own code. (grpcio's own "Exception deserializing request" path was measured
    to leak ~14 KB per malformed unary request; 10,000 hostile requests grew the server by ~130 MB.)
    PushUpdate's chunks are parsed lazily by `read_update`, which accepts bytes."""

    def unary(method, cls):
        def handler(raw: bytes, context: grpc.ServicerContext):
            with abort_on_wire_error(context):
                request = _parse(cls, raw)
            return method(request, context)

        return handler

    def unary_stream(method, cls):
        def handler(raw: bytes, context: grpc.ServicerContext):
            with abort_on_wire_error(context):
                request = _parse(cls, raw)
            yield from method(request, context)

        return handler

    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            unary(servicer.Join, pb2.JoinRequest), response_serializer=pb2.JoinReply.SerializeToString),
        "PullTask": grpc.unary_stream_rpc_method_handler(
            unary_stream(servicer.PullTask, pb2.TaskRequest), response_serializer=pb2.TaskChunk.SerializeToString),
        "PushUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.PushUpdate, response_serializer=pb2.PushReply.SerializeToString),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(
            unary(servicer.Heartbeat, pb2.HeartbeatRequest), response_serializer=pb2.HeartbeatReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options for both server and channel: explicit send/receive message limits."""
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def status_code(exc: WireError) -> grpc.StatusCode:
    """gRPC status for a wire error: limit → RESOURCE_EXHAUSTED, integrity → DATA_LOSS,
    permission → PERMISSION_DENIED, anything else → INVALID_ARGUMENT."""
    if isinstance(exc, WireLimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, WireIntegrityError):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(exc, WirePermissionError):
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.INVALID_ARGUMENT


@contextmanager
def abort_on_wire_error(context: grpc.ServicerContext) -> Iterator[None]:
    """In a servicer: `with abort_on_wire_error(context): ...` turns WireError into an abort."""
    try:
        yield
    except WireError as e:
        context.abort(status_code(e), str(e))


# --- byte accounting ------------------------------------------------------------------------


def wire_bytes(messages: Iterable[Message]) -> int:
    """Σ serialized protobuf size (excludes gRPC's 5-byte frame prefix and HTTP/2 framing)."""
    return sum(m.ByteSize() for m in messages)


class ByteCounter:
    """Counts messages and serialized bytes flowing through `wrap(stream)`."""

    def __init__(self) -> None:
        self.bytes = 0
        self.messages = 0

    def wrap(self, messages: Iterable[Message]) -> Iterator[Message]:
        for m in messages:
            self.bytes += m.ByteSize()
            self.messages += 1
            yield m


# --- unary messages -------------------------------------------------------------------------


@dataclass
class Limits:
    max_chunk_bytes: int = CHUNK_BYTES
    max_upload_bytes: int = 1 << 30
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


@dataclass
class JoinRequest:
    client_id: str
    base_fingerprint: str  # hex sha256 of the base weights
    capabilities: dict[str, str] = field(default_factory=dict)
    client_version: str = ""


@dataclass
class JoinReply:
    accepted: bool
    reason: str = ""
    expected_fingerprint: str = ""
    run_name: str = ""
    algorithm: str = ""
    heartbeat_interval_s: float = 0.0
    limits: Limits = field(default_factory=Limits)


@dataclass
class TaskRequest:
    client_id: str
    base_version: int | None = None  # None: not set up yet


@dataclass
class HeartbeatRequest:
    client_id: str
    task_id: str = ""  # task in progress, "" if idle


@dataclass
class HeartbeatReply:
    known: bool
    heartbeat_interval_s: float = 0.0
    run_finished: bool = False
    cancel_task: bool = False


@dataclass
class PushReply:
    accepted: bool
    reason: str = ""


# Dataclass ⇄ message pairs; field names are identical on both sides.
_PAIRS: dict[type, type[Message]] = {
    Limits: pb2.ServerLimits,
    JoinRequest: pb2.JoinRequest,
    JoinReply: pb2.JoinReply,
    TaskRequest: pb2.TaskRequest,
    HeartbeatRequest: pb2.HeartbeatRequest,
    HeartbeatReply: pb2.HeartbeatReply,
    PushReply: pb2.PushReply,
}
_DATACLASS = {m: d for d, m in _PAIRS.items()}

Unary = JoinRequest | JoinReply | TaskRequest | HeartbeatRequest | HeartbeatReply | PushReply


def to_proto(obj: Unary) -> Message:
    """Dataclass → protobuf message (for stubs' requests and servicers' replies)."""
    if type(obj) not in _PAIRS:
        raise TypeError(f"no protobuf mapping for {type(obj).__name__}")
    kw = {f.name: getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) is not None}
    kw = {k: to_proto(v) if type(v) in _PAIRS else v for k, v in kw.items()}
    return _PAIRS[type(obj)](**kw)


def from_proto(msg: Message) -> Unary:
    """Protobuf message (request or reply of a unary RPC) → dataclass. Unset optional fields
    (TaskRequest.base_version, JoinReply.limits) take the dataclass default."""
    if type(msg) not in _DATACLASS:
        raise TypeError(f"no dataclass mapping for {type(msg).__name__}")
    kw: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            kw[fd.name] = dict(value)
        elif fd.has_presence and not msg.HasField(fd.name):
            continue
        else:
            kw[fd.name] = from_proto(value) if isinstance(value, Message) else value
    return _DATACLASS[type(msg)](**kw)


# --- chunking -------------------------------------------------------------------------------


def _split(blob: bytes, chunk_bytes: int) -> tuple[int, Iterator[bytes]]:
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    total = max(1, math.ceil(len(blob) / chunk_bytes))
    view = memoryview(blob)
    return total, (bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes]) for i in range(total))


M = TypeVar("M", bound=Message)


def _parse(cls: type[M], item: M | bytes) -> M:
    """Accept a message, or its serialized bytes (DecodeError → WireError)."""
    if isinstance(item, cls):
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        try:
            return cls.FromString(bytes(item))
        except (DecodeError, ValueError, RuntimeError) as e:
            raise WireError(f"cannot decode {cls.__name__}: {e}") from e
    raise WireError(f"expected {cls.__name__}, got {type(item).__name__}")


def safe_str(value: object, limit: int = 80) -> str:
    """A peer-supplied string for logs and error details: repr-quoted (newlines and control characters escaped,
    so it cannot forge a log line) and capped at `limit` characters."""
    text = str(value)
    return repr(text[:limit]) + (f"…(+{len(text) - limit} chars)" if len(text) > limit else "")


def _check_id(value: str, what: str) -> str:
    if not value or len(value) > MAX_ID_CHARS:
        raise WireError(f"{what} must be 1..{MAX_ID_CHARS} characters, got {len(value)}")
    return value


class _Assembler:
    """Reassembles one blob; checks limit first, then order, running size, sha256."""

    def __init__(self, what: str, task_id: str, total: int, total_bytes: int, sha256: bytes, max_bytes: int) -> None:
        self.what, self.task_id, self.total, self.total_bytes, self.sha256 = what, task_id, total, total_bytes, sha256
        if total_bytes > max_bytes:
            raise WireLimitError(f"{what}: declared size {total_bytes} bytes exceeds limit {max_bytes}")
        if total_bytes < 1 or not 1 <= total <= total_bytes:
            raise WireError(f"{what}: invalid total_bytes={total_bytes} / total={total} chunks")
        if len(sha256) != 32:
            raise WireError(f"{what}: sha256 must be 32 bytes, got {len(sha256)}")
        self.parts: list[bytes] = []
        self.received = 0

    def add(self, task_id: str, index: int, total: int, data: bytes) -> None:
        if task_id != self.task_id or total != self.total:
            raise WireError(f"{self.what}: chunk {index} has task_id/total inconsistent with chunk 0")
        if index != len(self.parts):
            why = "duplicate or out-of-order" if index < len(self.parts) else "missing or out-of-order"
            raise WireError(f"{self.what}: expected chunk {len(self.parts)}, got {index} ({why})")
        if index >= self.total:
            raise WireError(f"{self.what}: chunk index {index} beyond declared total {self.total}")
        if not data:
            raise WireError(f"{self.what}: empty chunk {index}")
        self.received += len(data)
        if self.received > self.total_bytes:
            raise WireIntegrityError(f"{self.what}: more data than the declared {self.total_bytes} bytes")
        self.parts.append(data)

    def finish(self) -> bytes:
        if len(self.parts) != self.total:
            raise WireError(f"{self.what}: stream ended after {len(self.parts)} of {self.total} chunks")
        if self.received != self.total_bytes:
            raise WireIntegrityError(f"{self.what}: got {self.received} bytes, declared {self.total_bytes}")
        blob = b"".join(self.parts)
        self.parts = []
        if hashlib.sha256(blob).digest() != self.sha256:
            raise WireIntegrityError(f"{self.what}: sha256 mismatch")
        return blob


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


def instruction_to_chunks(instr: Instruction, task_id: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb2.TaskChunk]:
    """Instruction → TASK chunks (chunk 0 carries the header). Lazy: one chunk in memory at a time
    besides the blob."""
    _check_id(task_id, "task_id")
    tensors: TensorDict = {f"sync/{k}": v for k, v in instr.sync.tensors.items()}
    if instr.setup is not None:
        tensors.update({f"setup/{k}": v for k, v in instr.setup.tensors.items()})
    blob = pack(tensors)
    header = pb2.TaskHeader(
        round=instr.round,
        client_id=instr.client_id,
        base_version=instr.base_version,
        train_json=dumps_json(instr.train, "Instruction.train"),
        sync_meta_json=dumps_json(instr.sync.meta, "sync Payload.meta"),
        has_setup=instr.setup is not None,
        setup_meta_json=dumps_json(instr.setup.meta, "setup Payload.meta") if instr.setup is not None else "",
        total_bytes=len(blob),
        sha256=hashlib.sha256(blob).digest(),
    )
    if header.ByteSize() > MAX_HEADER_BYTES:
        raise WireLimitError(
            f"task header is {header.ByteSize()} bytes; limit {MAX_HEADER_BYTES} (move meta into tensors)"
        )
    total, parts = _split(blob, chunk_bytes)
    for i, data in enumerate(parts):
        yield pb2.TaskChunk(
            kind=pb2.TaskChunk.TASK, task_id=task_id, index=i, total=total, header=header if i == 0 else None, data=data
        )


def _instruction(h: pb2.TaskHeader, blob: bytes) -> Instruction:
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
    first = _parse(pb2.TaskChunk, first)
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
    asm = _Assembler("task", _check_id(first.task_id, "task_id"), first.total, h.total_bytes, h.sha256, max_bytes)
    chunk: pb2.TaskChunk | None = first
    while chunk is not None:
        if chunk is not first and (chunk.kind != pb2.TaskChunk.TASK or chunk.HasField("header")):
            raise WireError(f"PullTask: chunk {chunk.index} must be a TASK chunk without header")
        asm.add(chunk.task_id, chunk.index, chunk.total, chunk.data)
        nxt = next(it, None)
        chunk = None if nxt is None else _parse(pb2.TaskChunk, nxt)
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


def update_to_chunks(
    update: ClientUpdate, task_id: str, chunk_bytes: int = CHUNK_BYTES, *, compact: bool = True
) -> Iterator[pb2.UpdateChunk]:
    """ClientUpdate → UpdateChunks (chunk 0 carries client_id, num_examples, metrics, and for a small update the
    compact record's tensor list). compact=False: always safetensors (what every update was before the compact
    record; benchmarks compare the two)."""
    _check_id(task_id, "task_id")
    if update.num_examples < 0:
        raise WireError(f"num_examples must be >= 0, got {update.num_examples}")
    raw = _compact(update.tensors) if compact else None
    blob = pack(update.tensors) if raw is None else raw_pack({r.name: update.tensors[r.name] for r in raw})
    digest = hashlib.sha256(blob).digest()
    total, parts = _split(blob, chunk_bytes)
    for i, data in enumerate(parts):
        msg = pb2.UpdateChunk(task_id=task_id, index=i, total=total, total_bytes=len(blob), sha256=digest, data=data)
        if i == 0:
            msg.client_id = update.client_id
            msg.num_examples = update.num_examples
            msg.metrics.update({k: float(v) for k, v in update.metrics.items()})
            if raw is not None:
                msg.raw_tensors.extend(raw)
        yield msg


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
    first = _parse(pb2.UpdateChunk, raw)
    task_id = _check_id(first.task_id, "task_id")
    if expected_task_id is not None:
        ok = task_id == expected_task_id if isinstance(expected_task_id, str) else task_id in expected_task_id
        if not ok:
            raise WirePermissionError(f"PushUpdate: task {safe_str(task_id)} is not an open task of this client")
    if expected_client_id is not None and first.client_id != expected_client_id:
        raise WirePermissionError(
            f"PushUpdate: update names client {safe_str(first.client_id)}, caller is {expected_client_id!r}"
        )
    if first.num_examples < 0:
        raise WireError(f"PushUpdate: num_examples must be >= 0, got {first.num_examples}")
    asm = _Assembler("update", task_id, first.total, first.total_bytes, first.sha256, max_bytes)
    layout = _raw_layout(first.raw_tensors, asm.total_bytes) if first.raw_tensors else None
    if reserve is not None:
        reserve(asm.total_bytes)
    chunk: pb2.UpdateChunk | None = first
    while chunk is not None:
        if chunk.total_bytes != asm.total_bytes or chunk.sha256 != asm.sha256:
            raise WireError(f"PushUpdate: chunk {chunk.index} total_bytes/sha256 inconsistent with chunk 0")
        if chunk is not first and chunk.raw_tensors:
            raise WireError(f"PushUpdate: chunk {chunk.index} lists raw_tensors (chunk 0 only)")
        asm.add(chunk.task_id, chunk.index, chunk.total, chunk.data)
        nxt = next(it, None)
        chunk = None if nxt is None else _parse(pb2.UpdateChunk, nxt)
    tensors = unpack(asm.finish()) if layout is None else raw_unpack(asm.finish(), layout)
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
