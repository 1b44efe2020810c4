"""Chunked streams, built and read without extra copies: a blob cut into ≤ CHUNK_BYTES runs of zero-copy slices,
each serialized straight into its chunk message (`with_data`); on receipt the data field is lifted out of the raw
bytes gRPC delivered (`parse_chunk`) and reassembled, checked and hashed chunk by chunk (`Assembler`); byte
accounting over serialized messages."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from google.protobuf.message import DecodeError, Message

from fedtune.transports.wire.checks import WireError, WireIntegrityError, WireLimitError

CHUNK_BYTES = 1 << 20  # data bytes per chunk

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


def chunk_runs(parts: list[bytes | memoryview], chunk_bytes: int) -> tuple[int, int, Iterator[list[memoryview]]]:
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


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def with_data(msg: Message, run: list[memoryview]) -> bytes:
    """`msg` serialized with its `data` field set to the concatenation of `run`, in one copy (protobuf would copy
    into the message, then again to serialize). Fields may appear in any order on the wire, so this parses as
    `msg` with `data` set; for a chunk after the first it is even byte-identical to protobuf's own output."""
    tag = msg.DESCRIPTOR.fields_by_name["data"].number << 3 | 2  # wire type 2: length-delimited
    return b"".join([msg.SerializeToString(), varint(tag), varint(sum(map(len, run))), *run])


def parse(cls: type[M], item: M | bytes) -> M:
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


def parse_chunk(cls: type[M], item: M | bytes) -> tuple[M, bytes | memoryview]:
    """(the chunk message, its data): from serialized bytes without copying the data (see `_lift_data`)."""
    if isinstance(item, bytes):
        lifted = _lift_data(item, cls.DESCRIPTOR.fields_by_name["data"].number)
        if lifted is not None:
            return parse(cls, lifted[0]), lifted[1]
    msg = parse(cls, item)
    return msg, msg.data


class Assembler:
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

