"""Tensors ⇄ bytes. The only tensor format on the wire is safetensors; nothing is ever unpickled.

Blob format (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes
of JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then raw
little-endian tensor data. A payload blob stores `Payload.meta` as JSON in
`__metadata__["fedtune.meta"]`; an update blob stores client_id / num_examples / metrics as JSON in
`__metadata__["fedtune.update"]`. Output is deterministic: keys sorted, tensors contiguous on CPU.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from fedtune.algorithms.base import ClientUpdate, Payload, TensorDict

META_KEY = "fedtune.meta"
UPDATE_KEY = "fedtune.update"
MAX_JSON_BYTES = 1 << 20  # per JSON document carried in a header or message field


class WireError(ValueError):
    """Malformed or unacceptable data on the wire."""


class WireLimitError(WireError):
    """A declared or actual size exceeds a limit (gRPC: RESOURCE_EXHAUSTED)."""


class WireIntegrityError(WireError):
    """Data does not match its declared sha256 / size (gRPC: DATA_LOSS)."""


def _prepare(tensors: TensorDict) -> TensorDict:
    """Sorted, detached, contiguous CPU tensors that own their storage (safetensors refuses
    views and shared storage)."""
    out: TensorDict = {}
    seen: set[int] = set()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise WireError(f"tensor dict must map str -> torch.Tensor; got {name!r}: {type(t).__name__}")
        if t.layout != torch.strided:
            raise WireError(f"tensor {name!r}: only dense tensors can be sent (layout {t.layout})")
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _save(tensors: TensorDict, metadata: dict[str, str] | None) -> bytes:
    try:
        return _st_save(_prepare(tensors), metadata=metadata)
    except WireError:
        raise
    except Exception as e:  # unsupported dtype etc.
        raise WireError(f"cannot serialize tensors: {e}") from e


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


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (validates the header framing)."""
    if not isinstance(data, bytes):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    if len(data) < 8:
        raise WireError(f"not a safetensors blob: {len(data)} bytes, need at least 8")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise WireError(f"not a safetensors blob: header length {n} exceeds blob size {len(data)}")
    header = loads_json_object(data[8 : 8 + n], "safetensors header")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise WireError("safetensors __metadata__ must be a {str: str} object")
    return meta


def _load(data: bytes) -> TensorDict:
    try:
        tensors = _st_load(data)
    except SafetensorError as e:
        raise WireError(f"malformed safetensors blob: {e}") from e
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust panic (pyo3 PanicException) is a BaseException
        raise WireError(f"malformed safetensors blob: {type(e).__name__}: {e}") from e
    return dict(sorted(tensors.items()))


def pack(tensors: TensorDict) -> bytes:
    """Tensors → safetensors bytes (deterministic; {} allowed)."""
    return _save(tensors, None)


def unpack(data: bytes) -> TensorDict:
    """safetensors bytes → tensors (CPU, sorted by name). WireError on malformed input."""
    read_metadata(data)
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


def unpack_payload(data: bytes) -> Payload:
    meta = read_metadata(data)
    if META_KEY not in meta:
        raise WireError(f"not a payload blob: header metadata lacks {META_KEY!r}")
    return Payload(tensors=_load(data), meta=loads_json_object(meta[META_KEY], "Payload.meta"))


def pack_update(update: ClientUpdate) -> bytes:
    """ClientUpdate → one blob: tensors plus {client_id, num_examples, metrics} as JSON."""
    info = {"client_id": update.client_id, "num_examples": update.num_examples, "metrics": update.metrics}
    return _save(update.tensors, {UPDATE_KEY: dumps_json(info, "ClientUpdate fields")})


def unpack_update(data: bytes) -> ClientUpdate:
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
