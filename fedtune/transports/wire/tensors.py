"""Tensors ⇄ bytes. The only tensor format on the wire is safetensors; nothing is ever unpickled.

Blob format (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes
of JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then raw
little-endian tensor data. A payload blob stores `Payload.meta` as JSON in
`__metadata__["fedtune.meta"]`; an update blob stores client_id / num_examples / metrics as JSON in
`__metadata__["fedtune.update"]`. Output is deterministic: keys sorted, tensors contiguous on CPU.

The format is written and read here rather than through `safetensors.torch`, whose bytes API copies every tensor
twice each way; the output is byte-identical to `safetensors.torch.save` (same layout: tensors ordered by dtype
rank then name, header padded to 8 bytes) and `unpack` applies the same validation as safetensors' loader
(contiguous, in-bounds, size-consistent offsets) before it makes any tensor. `pack_parts` gives the blob as
zero-copy pieces (header + each tensor's memory); `unpack` of a writable buffer returns tensors that are views
into it (each with its own storage over its own bytes), so a received blob is never copied again.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import torch

from fedtune.algorithms.api import ClientUpdate, Payload, TensorDict
from fedtune.transports.wire.checks import WireError, WireLimitError

META_KEY = "fedtune.meta"
UPDATE_KEY = "fedtune.update"
MAX_JSON_BYTES = 1 << 20  # per JSON document carried in a header or message field
# safetensors dtype names in safetensors' own rank order: the writer lays tensors out by descending rank, then
# name, which keeps every tensor aligned to its element size (the header is padded to a multiple of 8).
_ST_NAMES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.uint64: "U64",
}
_RANK = {dt: i for i, dt in enumerate(_ST_NAMES)}
_ST_DTYPES = {name: dt for dt, name in _ST_NAMES.items()}
_MAX_DIMS = 64


def _little_endian() -> None:
    if sys.byteorder != "little":  # safetensors data is little-endian; raw views would be wrong on this host
        raise WireError("fedtune's wire format needs a little-endian host")


def _prepare(tensors: TensorDict) -> TensorDict:
    """Sorted, detached, contiguous CPU tensors (views and shared storage are fine: only their bytes are read)."""
    out: TensorDict = {}
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise WireError(f"tensor dict must map str -> torch.Tensor; got {name!r}: {type(t).__name__}")
        if name == "__metadata__":
            raise WireError("'__metadata__' is reserved by safetensors and cannot name a tensor")
        if t.layout != torch.strided:
            raise WireError(f"tensor {name!r}: only dense tensors can be sent (layout {t.layout})")
        if t.dtype not in _ST_NAMES:
            raise WireError(f"cannot serialize tensors: tensor {name!r} has unsupported dtype {t.dtype}")
        out[name] = t.detach().to("cpu").contiguous().resolve_conj().resolve_neg()
    return out


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _head(layout: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None,
            ) -> tuple[bytes, list[tuple[str, int]]]:
    """The safetensors head (8-byte length + JSON header padded to 8 B) for tensors of these {name: (shape,
    dtype)}, and (name, nbytes) in data order (widest dtype first, then by name)."""
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    order: list[tuple[str, int]] = []
    offset = 0
    for name, (shape, dtype) in sorted(layout.items(), key=lambda kv: (-_RANK[kv[1][1]], kv[0])):
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        order.append((name, n))
        offset += n
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head, order


def pack_parts(tensors: TensorDict, metadata: dict[str, str] | None = None) -> list[bytes | memoryview]:
    """The safetensors blob as pieces: [8-byte length + JSON header, then each non-empty tensor's memory].
    `b"".join(parts)` is the blob; the pieces are views (no copy), valid while the tensors are unchanged."""
    _little_endian()
    prepared = _prepare(tensors)
    head, order = _head({k: (tuple(t.shape), t.dtype) for k, t in prepared.items()}, metadata)
    return [head, *(_raw(prepared[name]) for name, n in order if n)]


def blob_size(layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Exact size of the safetensors blob `pack_parts` makes of tensors with these {name: (shape, dtype)}, without
    the tensors (a receiver's bound on what an honest sender of them declares)."""
    head, order = _head(layout, None)
    return len(head) + sum(n for _, n in order)


def _save(tensors: TensorDict, metadata: dict[str, str] | None) -> bytes:
    return b"".join(pack_parts(tensors, metadata))


def dumps_json(obj: Any, what: str) -> str:
    """Canonical JSON (sorted keys) with a size limit; WireError if not JSON-serializable."""
    try:
        s = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise WireError(f"{what} must be JSON-serializable: {e}") from e
    if len(s.encode()) > MAX_JSON_BYTES:
        raise WireLimitError(
            f"{what} is {len(s.encode())} bytes of JSON; limit {MAX_JSON_BYTES} (send tensors instead)"
        )
    return s


def loads_json_object(s: str | bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object received from the network; WireError on anything else."""
    if len(s) > MAX_JSON_BYTES:
        raise WireLimitError(f"{what}: {len(s)} bytes of JSON exceeds limit {MAX_JSON_BYTES}")
    try:
        obj = json.loads(s)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise WireError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise WireError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


Blob = bytes | bytearray | memoryview


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise WireError("malformed safetensors blob: duplicate key in the header")
    return out


def _header(data: memoryview) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, parsed JSON header) with the framing checked."""
    if len(data) < 8:
        raise WireError(f"not a safetensors blob: {len(data)} bytes, need at least 8")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise WireError(f"not a safetensors blob: header length {n} exceeds blob size {len(data)}")
    if n > MAX_JSON_BYTES:
        raise WireLimitError(f"safetensors header: {n} bytes of JSON exceeds limit {MAX_JSON_BYTES}")
    try:
        header = json.loads(bytes(data[8 : 8 + n]), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise WireError(f"safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise WireError(f"safetensors header must be a JSON object, got {type(header).__name__}")
    return 8 + n, header


def _metadata(header: dict[str, Any]) -> dict[str, str]:
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise WireError("safetensors __metadata__ must be a {str: str} object")
    return meta


def read_metadata(data: Blob) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (validates the header framing)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    return _metadata(_header(memoryview(data).cast("B"))[1])


def _entries(header: dict[str, Any], size: int) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """Validated (name, dtype, shape, begin, end) of every tensor: the checks of safetensors' own loader — known
    dtype, non-negative shape, offsets contiguous from 0 to the end of the data, each exactly numel·itemsize."""
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"malformed safetensors blob: tensor {name[:80]!r} needs exactly dtype, shape, data_offsets")
        dtype, shape, offsets = _ST_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        if dtype is None:
            raise WireError(f"malformed safetensors blob: tensor {name[:80]!r} has unknown dtype {info['dtype']!r:.40}")
        ints = (lambda xs: isinstance(xs, list) and all(type(x) is int and 0 <= x < 1 << 62 for x in xs))
        if not ints(shape) or len(shape) > _MAX_DIMS or not ints(offsets) or len(offsets) != 2:
            raise WireError(f"malformed safetensors blob: tensor {name[:80]!r} has an invalid shape or data_offsets")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise WireError(f"malformed safetensors blob: tensor {name[:80]!r}: data_offsets {offsets} do not hold "
                            f"shape {shape[:8]} of {info['dtype']}")
        out.append((name, dtype, shape, begin, end))
    position = 0
    for name, _, _, begin, end in sorted(out, key=lambda e: (e[3], e[4])):
        if begin != position:
            raise WireError(f"malformed safetensors blob: tensor {name[:80]!r} starts at {begin}, expected {position}")
        position = end
    if position != size:
        raise WireError(f"malformed safetensors blob: tensors cover {position} bytes of a {size}-byte data section")
    return sorted(out)


def _load(data: Blob) -> TensorDict:
    """Tensors of a validated blob, sorted by name. A writable buffer is not copied: each tensor is a view of its
    own bytes in it (aligned ones; a misaligned one, which only a hand-made blob can have, gets a copy). A
    read-only one (bytes) is copied once first, so the tensors are always writable."""
    _little_endian()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    start, header = _header(view)
    _metadata(header)
    entries = _entries(header, len(view) - start)
    if view.readonly and len(view) > start:
        view = memoryview(bytearray(view))
    base = torch.frombuffer(view, dtype=torch.uint8).data_ptr() if len(view) > start else 0
    out: TensorDict = {}
    try:
        for name, dtype, shape, begin, end in entries:
            if begin == end:
                t = torch.empty(shape, dtype=dtype)
            elif (base + start + begin) % dtype.itemsize == 0:
                t = torch.frombuffer(view, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
            else:
                t = torch.frombuffer(bytearray(view[start + begin : start + end]), dtype=dtype)
            if dtype == torch.bool:  # a byte other than 0/1 is not a valid bool: normalise
                t = t.view(torch.uint8).ne(0)
            out[name] = t.view(shape)
    except (RuntimeError, ValueError, OverflowError) as e:
        raise WireError(f"malformed safetensors blob: {e}") from e
    return out


def pack(tensors: TensorDict) -> bytes:
    """Tensors → safetensors bytes (deterministic; {} allowed)."""
    return _save(tensors, None)


def unpack(data: Blob) -> TensorDict:
    """safetensors bytes → tensors (CPU, sorted by name, writable; views into `data` if it is writable).
    WireError on malformed input."""
    return _load(data)


def raw_pack(tensors: TensorDict) -> bytes:
    """The tensors' raw C-order bytes (native = little-endian on every supported host), concatenated in the given
    order; the compact update record (wire/serde.py) describes names, dtypes and shapes itself."""
    parts = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise WireError(f"tensor {name!r}: only dense tensors can be sent")
        parts.append(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


def raw_unpack(data: bytes, layout: list[tuple[str, torch.dtype, tuple[int, ...], int]]) -> TensorDict:
    """Inverse of `raw_pack` for `layout` = [(name, dtype, shape, nbytes)] whose nbytes sum to len(data) (checked
    by the caller before the data arrived). Tensors own their memory; sorted by name like `unpack`."""
    if sum(n for *_, n in layout) != len(data):
        raise WireError(f"compact record: {len(data)} bytes, its tensors take {sum(n for *_, n in layout)}")
    out: TensorDict = {}
    off = 0
    for name, dtype, shape, n in layout:
        try:
            t = (torch.frombuffer(bytearray(data[off : off + n]), dtype=dtype) if n else torch.empty(0, dtype=dtype))
            out[name] = t.reshape(shape)
        except (RuntimeError, ValueError, TypeError) as e:
            raise WireError(f"compact record: tensor {name!r} {dtype} {list(shape)}: {e}") from e
        if dtype == torch.bool and n and int(t.view(torch.uint8).max()) > 1:
            raise WireError(f"compact record: bool tensor {name!r} holds bytes other than 0 and 1")
        off += n
    return dict(sorted(out.items()))


def pack_payload(payload: Payload) -> bytes:
    """Payload → one blob: its tensors plus `meta` as JSON in the header."""
    return _save(payload.tensors, {META_KEY: dumps_json(payload.meta, "Payload.meta")})


def unpack_payload(data: Blob) -> Payload:
    meta = read_metadata(data)
    if META_KEY not in meta:
        raise WireError(f"not a payload blob: header metadata lacks {META_KEY!r}")
    return Payload(tensors=_load(data), meta=loads_json_object(meta[META_KEY], "Payload.meta"))


def pack_update(update: ClientUpdate) -> bytes:
    """ClientUpdate → one blob: tensors plus {client_id, num_examples, metrics} as JSON."""
    info = {"client_id": update.client_id, "num_examples": update.num_examples, "metrics": update.metrics}
    return _save(update.tensors, {UPDATE_KEY: dumps_json(info, "ClientUpdate fields")})


def unpack_update(data: Blob) -> ClientUpdate:
    meta = read_metadata(data)
    if UPDATE_KEY not in meta:
        raise WireError(f"not an update blob: header metadata lacks {UPDATE_KEY!r}")
    info = loads_json_object(meta[UPDATE_KEY], "ClientUpdate fields")
    cid, n, metrics = (info.get("client_id"), info.get("num_examples"), info.get("metrics"))
    if not isinstance(cid, str) or type(n) is not int or n < 0 or not isinstance(metrics, dict):
        raise WireError("update blob: need client_id (str), num_examples (int >= 0), metrics (object)")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise WireError("update blob: metrics values must be numbers")
    return ClientUpdate(cid, n, _load(data), {k: float(v) for k, v in metrics.items()})
