"""Domain objects ⇄ protobuf messages of fedtune.v1 (protos/fedtune/v1/fedtune.proto).

The ONLY module that imports the generated `_pb2` code: the coordinator and the edge agent use
the dataclasses and functions here, plus the re-exported `CoordinatorStub`,
`CoordinatorServicer` and `add_servicer`.

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
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError, Message

from fedtune.algorithms.api import ClientUpdate, Instruction, Payload, TensorDict, UpdateSpec, payload_nbytes
from fedtune.transports.wire import fedtune_pb2 as pb2
from fedtune.transports.wire import fedtune_pb2_grpc as pb2_grpc
from fedtune.transports.wire.tensors import (
    WireError,
    WireIntegrityError,
    WireLimitError,
    blob_size,
    dumps_json,
    loads_json_object,
    pack_parts,
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

CoordinatorServicer = pb2_grpc.CoordinatorServicer
SERVICE_NAME = "fedtune.v1.Coordinator"  # for the health service / reflection


class WirePermissionError(WireError):
    """The stream is well-formed but not this client's to send (gRPC: PERMISSION_DENIED)."""


def _serialize(msg: Message | bytes) -> bytes:
    """gRPC serializer for streams of chunks: pre-serialized chunks (`*_to_wire`) pass as they are."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class CoordinatorStub(pb2_grpc.CoordinatorStub):
    """The generated client stub, except: PushUpdate also takes pre-serialized chunks (`update_to_wire`), and
    PullTask yields the serialized chunks as they arrive (bytes, for `read_task`, which then hashes and buffers
    their data without copying it out of protobuf messages first)."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self.PullTask = channel.unary_stream(f"/{SERVICE_NAME}/PullTask",
                                             request_serializer=pb2.TaskRequest.SerializeToString)
        self.PushUpdate = channel.stream_unary(f"/{SERVICE_NAME}/PushUpdate", request_serializer=_serialize,
                                               response_deserializer=pb2.PushReply.FromString)


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
            unary_stream(servicer.PullTask, pb2.TaskRequest), response_serializer=_serialize),
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

M = TypeVar("M", bound=Message | bytes)


def _size(m: Message | bytes) -> int:
    return len(m) if isinstance(m, bytes) else m.ByteSize()


def wire_bytes(messages: Iterable[Message | bytes]) -> int:
    """Σ serialized protobuf size of messages or pre-serialized chunks (excludes gRPC's 5-byte frame prefix and
    HTTP/2 framing)."""
    return sum(map(_size, messages))


class ByteCounter:
    """Counts messages and serialized bytes flowing through `wrap(stream)`."""

    def __init__(self) -> None:
        self.bytes = 0
        self.messages = 0

    def wrap(self, messages: Iterable[M]) -> Iterator[M]:
        for m in messages:
            self.bytes += _size(m)
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


def _runs(parts: list[bytes | memoryview], chunk_bytes: int) -> tuple[int, int, Iterator[list[memoryview]]]:
    """(blob size, number of chunks, the chunks' data as runs of zero-copy slices of `parts`): the blob
    `b"".join(parts)` cut every `chunk_bytes` bytes, without ever building it."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    size = sum(len(p) for p in parts)

    def runs() -> Iterator[list[memoryview]]:
        run: list[memoryview] = []
        room = chunk_bytes
        for part in parts:
            view = memoryview(part)
            while len(view):
                run.append(view[:room])
                view, room = view[room:], room - len(run[-1])
                if not room:
                    yield run
                    run, room = [], chunk_bytes
        if run:
            yield run

    return size, max(1, math.ceil(size / chunk_bytes)), runs()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _with_data(msg: Message, run: list[memoryview]) -> bytes:
    """`msg` serialized with its `data` field set to the concatenation of `run`, in one copy (protobuf would copy
    into the message, then again to serialize). Fields may appear in any order on the wire, so this parses as
    `msg` with `data` set; for a chunk after the first it is even byte-identical to protobuf's own output."""
    tag = msg.DESCRIPTOR.fields_by_name["data"].number << 3 | 2  # wire type 2: length-delimited
    return b"".join([msg.SerializeToString(), _varint(tag), _varint(sum(map(len, run))), *run])


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


_MAX_SCAN_FIELDS = 64  # a chunk has ~10 fields (+ metrics); more: let protobuf parse it, at C speed


def _lift_data(raw: bytes, number: int) -> tuple[bytes, memoryview] | None:
    """A serialized chunk split into (the message without its data field, the data as a view of `raw`), so the
    data goes from what gRPC delivered straight into the hash and the receive buffer (protobuf would copy it
    twice: into the parsed message, and out again on `.data`). Only the top-level framing is walked here;
    protobuf still parses and validates everything else. A data field given twice counts once, the last (as
    protobuf does). None — parse the whole message with protobuf, which reports any error — when the framing
    is malformed or has more than _MAX_SCAN_FIELDS fields."""
    view, pos, end = memoryview(raw), 0, len(raw)
    keep: list[memoryview] = []
    data: memoryview | None = None
    kept_from = 0

    def varint(p: int) -> int:  # → value, advances nonlocal pos
        nonlocal pos
        value = shift = 0
        while p < end and shift < 64:
            byte = view[p]
            value |= (byte & 0x7F) << shift
            p += 1
            if not byte & 0x80:
                pos = p
                return value
            shift += 7
        raise ValueError

    try:
        for _ in range(_MAX_SCAN_FIELDS):
            if pos >= end:
                break
            start = pos
            key = varint(pos)
            wire_type = key & 7
            if wire_type == 0:
                varint(pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length = varint(pos)
                body, pos = pos, pos + length
            else:  # groups (deprecated) or invalid
                return None
            if pos > end:
                return None
            if key == number << 3 | 2:
                keep.append(view[kept_from:start])
                data, kept_from = view[body:pos], pos
        else:
            if pos < end:
                return None
    except ValueError:
        return None
    if data is None:
        return None
    keep.append(view[kept_from:])
    return b"".join(keep), data


def _parse_chunk(cls: type[M], item: M | bytes) -> tuple[M, bytes | memoryview]:
    """(the chunk message, its data): from serialized bytes without copying the data (see `_lift_data`)."""
    if isinstance(item, bytes):
        lifted = _lift_data(item, cls.DESCRIPTOR.fields_by_name["data"].number)
        if lifted is not None:
            return _parse(cls, lifted[0]), lifted[1]
    msg = _parse(cls, item)
    return msg, msg.data


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
    """Reassembles one blob; checks limit first, then per chunk order, consistency and running size (before the
    chunk is buffered), hashing each chunk as it arrives; `finish` compares the sha256 before handing out the blob.

    The buffer has the declared size (bounded by `max_bytes`), allocated at the first chunk (after the caller's
    reservation) and uninitialised, so its pages are only touched as data arrives. `sha256` is the digest declared
    so far (b"" if the stream declares it on a later chunk)."""

    def __init__(self, what: str, task_id: str, total: int, total_bytes: int, sha256: bytes, max_bytes: int) -> None:
        self.what, self.task_id, self.total, self.total_bytes, self.sha256 = what, task_id, total, total_bytes, b""
        if total_bytes > max_bytes:
            raise WireLimitError(f"{what}: declared size {total_bytes} bytes exceeds limit {max_bytes}")
        if total_bytes < 1 or not 1 <= total <= total_bytes:
            raise WireError(f"{what}: invalid total_bytes={total_bytes} / total={total} chunks")
        self._declare(sha256, 0)
        self.buffer: memoryview | None = None
        self.hash = hashlib.sha256()
        self.count = 0  # chunks received
        self.received = 0

    def _declare(self, sha256: bytes, index: int) -> None:
        if not sha256:
            return
        if len(sha256) != 32:
            raise WireError(f"{self.what}: sha256 must be 32 bytes, got {len(sha256)}")
        if self.sha256 and sha256 != self.sha256:
            raise WireError(f"{self.what}: chunk {index} has a sha256 inconsistent with an earlier chunk")
        self.sha256 = sha256

    def add(self, task_id: str, index: int, total: int, data: bytes | memoryview, sha256: bytes = b"") -> None:
        if task_id != self.task_id or total != self.total:
            raise WireError(f"{self.what}: chunk {index} has task_id/total inconsistent with chunk 0")
        if index != self.count:
            why = "duplicate or out-of-order" if index < self.count else "missing or out-of-order"
            raise WireError(f"{self.what}: expected chunk {self.count}, got {index} ({why})")
        if index >= self.total:
            raise WireError(f"{self.what}: chunk index {index} beyond declared total {self.total}")
        if not data:
            raise WireError(f"{self.what}: empty chunk {index}")
        end = self.received + len(data)
        if end > self.total_bytes:
            raise WireIntegrityError(f"{self.what}: more data than the declared {self.total_bytes} bytes")
        self._declare(sha256, index)
        if index == self.total - 1 and not self.sha256:
            raise WireError(f"{self.what}: no sha256 declared by the last chunk")
        if self.buffer is None:
            self.buffer = memoryview(torch.empty(self.total_bytes, dtype=torch.uint8).numpy())
        self.hash.update(data)  # releases the GIL on large chunks: overlaps with receiving the next one
        self.buffer[self.received : end] = data
        self.received, self.count = end, self.count + 1

    def finish(self) -> memoryview:
        """The whole blob (writable; `unpack` makes views of it), after the sha256 matched."""
        if self.count != self.total:
            raise WireError(f"{self.what}: stream ended after {self.count} of {self.total} chunks")
        if self.received != self.total_bytes or self.buffer is None:
            raise WireIntegrityError(f"{self.what}: got {self.received} bytes, declared {self.total_bytes}")
        if self.hash.digest() != self.sha256:
            self.buffer = None
            raise WireIntegrityError(f"{self.what}: sha256 mismatch")
        blob, self.buffer = self.buffer, None
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


def instruction_to_wire(instr: Instruction, task_id: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Instruction → serialized TASK chunks (chunk 0 carries the header, so the blob is hashed before it).
    Lazy: one chunk in memory at a time, built from the tensors' memory (which must not change meanwhile)."""
    _check_id(task_id, "task_id")
    tensors: TensorDict = {f"sync/{k}": v for k, v in instr.sync.tensors.items()}
    if instr.setup is not None:
        tensors.update({f"setup/{k}": v for k, v in instr.setup.tensors.items()})
    parts = pack_parts(tensors)
    size, total, runs = _runs(parts, chunk_bytes)
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
        yield _with_data(msg, run)


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
    first, data = _parse_chunk(pb2.TaskChunk, first)
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
    if not asm.sha256:
        raise WireError("PullTask: the task header lacks the sha256")
    chunk: pb2.TaskChunk | None = first
    while chunk is not None:
        if chunk is not first and (chunk.kind != pb2.TaskChunk.TASK or chunk.HasField("header")):
            raise WireError(f"PullTask: chunk {chunk.index} must be a TASK chunk without header")
        asm.add(chunk.task_id, chunk.index, chunk.total, data)
        nxt = next(it, None)
        chunk, data = (None, b"") if nxt is None else _parse_chunk(pb2.TaskChunk, nxt)
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
    _check_id(task_id, "task_id")
    if update.num_examples < 0:
        raise WireError(f"num_examples must be >= 0, got {update.num_examples}")
    raw = _compact(update.tensors) if compact else None
    parts = pack_parts(update.tensors) if raw is None else [raw_pack({r.name: update.tensors[r.name] for r in raw})]
    size, total, runs = _runs(parts, chunk_bytes)
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
        yield _with_data(msg, run)


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
    first, data = _parse_chunk(pb2.UpdateChunk, raw)
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
        if chunk.total_bytes != asm.total_bytes:
            raise WireError(f"PushUpdate: chunk {chunk.index} total_bytes inconsistent with chunk 0")
        if chunk is not first and chunk.raw_tensors:
            raise WireError(f"PushUpdate: chunk {chunk.index} lists raw_tensors (chunk 0 only)")
        asm.add(chunk.task_id, chunk.index, chunk.total, data, chunk.sha256)
        nxt = next(it, None)
        chunk, data = (None, b"") if nxt is None else _parse_chunk(pb2.UpdateChunk, nxt)
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
