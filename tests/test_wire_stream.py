"""fedtune.transports.wire streaming path: chunks built from tensor memory, sha256 while streaming, one preallocated receive
buffer, zero-copy unpack — and every check still in place (integrity, sizes, truncation, hostile blobs)."""

import hashlib
import json
import os
import random
from itertools import chain

import pytest
import torch
from google.protobuf.message import DecodeError
from safetensors.torch import save as st_save
from test_wire import _never, bits_equal, mixed, mutate, sorted_dict, stream

from fedtune.algorithms.api import ClientUpdate, Instruction, Payload
from fedtune.transports import wire
from fedtune.transports.wire import fedtune_pb2 as pb2
from fedtune.transports.wire import framing, streams
from fedtune.transports.wire.checks import WireError, WireIntegrityError, WireLimitError
from fedtune.transports.wire.tensors import META_KEY, dumps_json, pack, pack_parts, pack_payload, unpack

MiB = 1 << 20


def many_dtypes() -> dict[str, torch.Tensor]:
    """Several tensors of each kind an adapter can hold, sizes chosen so they straddle small chunks."""
    g = torch.Generator().manual_seed(3)
    return {
        "l0.A.bf16": torch.randn(5, 33, generator=g).to(torch.bfloat16),
        "l0.B.f16": torch.randn(17, 3, generator=g).to(torch.float16),
        "l1.A.f32": torch.randn(4, 29, generator=g),
        "l1.B.f64": torch.randn(11, generator=g, dtype=torch.float64),
        "seeds.i64": torch.randint(-(2**62), 2**62, (13,), generator=g),
        "idx.i32": torch.randint(-1000, 1000, (7, 3), generator=g, dtype=torch.int32),
        "small.i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "mask.bool": torch.rand(10, generator=g) > 0.5,
        "scalar.f32": torch.tensor(-0.0),
        "empty.bf16": torch.zeros(0, 4, dtype=torch.bfloat16),
        **mixed(),
    }


def raw_update(u: ClientUpdate, task_id: str = "t", chunk_bytes: int = 256, compact: bool = False) -> list[bytes]:
    """The streaming safetensors path (small updates default to the compact record: tests/test_wire_compact.py)."""
    return list(wire.update_to_wire(u, task_id, chunk_bytes=chunk_bytes, compact=compact))


def edit(raw: bytes, **fields) -> bytes:
    m = pb2.UpdateChunk.FromString(raw)
    for k, v in fields.items():
        setattr(m, k, v)
    return m.SerializeToString()


# --- format ----------------------------------------------------------------------------------


def test_pack_is_byte_identical_to_safetensors():
    t = many_dtypes()
    t["u16"], t["f8"] = torch.arange(5).to(torch.uint16), torch.randn(6).to(torch.float8_e4m3fn)
    assert pack(t) == st_save(t)
    meta = {"é": "ü\n", "n": [1, None]}
    assert pack_payload(Payload(t, meta)) == st_save(t, metadata={META_KEY: dumps_json(meta, "m")})
    parts = pack_parts(t)
    assert sum(isinstance(p, memoryview) for p in parts) == sum(1 for v in t.values() if v.numel())  # no copies


def test_round_trip_bit_identical_through_chunked_streams():
    t = many_dtypes()
    u = ClientUpdate("org-a", 9, t, {"loss": 0.5})
    for chunk_bytes in (64, 1000, MiB):  # tensors straddle chunks; one chunk
        task_id, v = wire.read_update(raw_update(u, "task-3", chunk_bytes), max_bytes=MiB, expected_task_id="task-3")
        assert task_id == "task-3" and (v.client_id, v.num_examples, v.metrics) == ("org-a", 9, {"loss": 0.5})
        assert bits_equal(v.tensors, sorted_dict(t))
        ins = Instruction(2, "org-a", 1, {"lr": 0.1}, Payload(t, {"v": 1}), Payload({"s": t["seeds.i64"]}, {}))
        got = wire.read_task(wire.instruction_to_wire(ins, "task-4", chunk_bytes), max_bytes=MiB).instruction
        assert bits_equal(got.sync.tensors, sorted_dict(t)) and bits_equal(got.setup.tensors, {"s": t["seeds.i64"]})
    # received tensors are views of the one buffer, each with a storage of exactly its own bytes, writable and
    # independent of each other
    for name, x in v.tensors.items():
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size(), name
    before = v.tensors["l0.B.f16"].clone()
    v.tensors["l0.A.bf16"].fill_(7)
    assert torch.equal(v.tensors["l0.B.f16"], before) and bool((v.tensors["l0.A.bf16"] == 7).all())


def test_serialized_chunks_parse_as_the_protobuf_messages():
    u = ClientUpdate("org-a", 3, {"a": torch.randn(300)}, {"loss": 1.0, "acc": 0.5})
    raw = raw_update(u)
    msgs = [pb2.UpdateChunk.FromString(r) for r in raw]
    assert [len(r) for r in raw] == [m.ByteSize() for m in msgs]
    assert raw[1:] == [m.SerializeToString() for m in msgs[1:]]  # chunk 0 differs only in field order
    assert (msgs[0].client_id, msgs[0].num_examples, dict(msgs[0].metrics)) == ("org-a", 3, {"loss": 1.0, "acc": 0.5})
    blob = b"".join(m.data for m in msgs)
    assert blob == pack(u.tensors) and {m.total_bytes for m in msgs} == {len(blob)}
    assert [m.sha256 for m in msgs] == [b""] * (len(msgs) - 1) + [hashlib.sha256(blob).digest()]
    assert all(len(m.data) == 256 for m in msgs[:-1]) and [m.index for m in msgs] == list(range(len(msgs)))
    t_raw = list(wire.instruction_to_wire(Instruction(1, "org-a", 0, {}, Payload(u.tensors)), "t", 256))
    t_msgs = [pb2.TaskChunk.FromString(r) for r in t_raw]
    assert t_raw == [m.SerializeToString() for m in t_msgs]  # data is TaskChunk's last field: canonical bytes
    assert t_msgs[0].header.sha256 == hashlib.sha256(b"".join(m.data for m in t_msgs)).digest()


# --- integrity and limits ----------------------------------------------------------------------


def test_corrupted_chunk_is_a_sha256_mismatch_and_nothing_is_unpacked(monkeypatch):
    raw = raw_update(ClientUpdate("c", 1, many_dtypes(), {}))
    m = pb2.UpdateChunk.FromString(raw[2])
    flipped = edit(raw[2], data=m.data[:10] + bytes([m.data[10] ^ 0x01]) + m.data[11:])
    monkeypatch.setattr(streams, "unpack", _never)
    with pytest.raises(WireIntegrityError, match="sha256 mismatch"):
        wire.read_update([*raw[:2], flipped, *raw[3:]], max_bytes=MiB)
    last = pb2.UpdateChunk.FromString(raw[-1])
    wrong = edit(raw[-1], sha256=hashlib.sha256(b"x").digest())  # the declared digest itself is wrong
    with pytest.raises(WireIntegrityError, match="sha256 mismatch"):
        wire.read_update([*raw[:-1], wrong], max_bytes=MiB)
    with pytest.raises(WireError, match="no sha256"):
        wire.read_update([*raw[:-1], edit(raw[-1], sha256=b"")], max_bytes=MiB)
    with pytest.raises(WireError, match="inconsistent"):  # an earlier chunk may repeat it, but must agree
        wire.read_update([edit(raw[0], sha256=b"\1" * 32), *raw[1:]], max_bytes=MiB)
    with pytest.raises(WireError, match="32 bytes"):
        wire.read_update([*raw[:-1], edit(raw[-1], sha256=last.sha256[:31])], max_bytes=MiB)


def test_digest_repeated_on_every_chunk_is_accepted():
    """The previous layout (sha256 on every chunk) is still a valid stream."""
    u = ClientUpdate("c", 1, many_dtypes(), {})
    raw = raw_update(u)
    digest = pb2.UpdateChunk.FromString(raw[-1]).sha256
    _, v = wire.read_update([edit(r, sha256=digest) for r in raw], max_bytes=MiB)
    assert bits_equal(v.tensors, sorted_dict(u.tensors))


def test_more_bytes_than_declared_rejected_before_buffering():
    raw = raw_update(ClientUpdate("c", 1, {"a": torch.randn(200)}, {}))
    declared = pb2.UpdateChunk.FromString(raw[0]).total_bytes
    # chunk 0 alone carries more than the whole declared blob: refused before a buffer exists
    asm = framing.Assembler("update", "t", 1, 100, b"", MiB)
    with pytest.raises(WireIntegrityError, match="more data"):
        asm.add("t", 0, 1, b"\0" * 101)
    assert asm.buffer is None and asm.received == 0
    # a later chunk overflows: refused when it arrives, nothing after it is read, and not one byte of it is
    # hashed or buffered
    reserved = []
    over = edit(raw[3], data=pb2.UpdateChunk.FromString(raw[3]).data + b"\0" * (declared + 1))
    with pytest.raises(WireIntegrityError, match="more data"):
        wire.read_update(stream(raw[0], chain(raw[1:3], [over], map(_never, [0]))), max_bytes=MiB,
                          reserve=reserved.append)
    assert reserved == [declared]
    asm = framing.Assembler("update", "t", 3, 300, b"", MiB)
    asm.add("t", 0, 3, b"\1" * 100)
    state = asm.hash.copy().digest()
    with pytest.raises(WireIntegrityError, match="more data"):
        asm.add("t", 1, 3, b"\2" * 201)
    assert asm.received == 100 and asm.hash.digest() == state
    # the declared size itself over the limit: refused at chunk 0, before `reserve` and before any buffer
    with pytest.raises(WireLimitError, match="exceeds limit"):
        wire.read_update(stream(raw[0], map(_never, [0])), max_bytes=declared - 1, reserve=_never)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_declared_size_is_not_touched_before_data_arrives():
    """The receive buffer has the declared size but costs memory only as chunks fill it: a peer that declares
    512 MiB and stalls after one chunk does not make the receiver resident 512 MiB."""
    declared = 512 * MiB
    first = pb2.UpdateChunk(task_id="t", index=0, total=512, total_bytes=declared, data=b"\1" * 1024)
    seen = []

    def rest():
        seen.append(_rss())
        yield from ()  # then the stream ends: truncated

    before = _rss()
    with pytest.raises(WireError, match="ended after"):
        wire.read_update(stream(first, rest()), max_bytes=declared)
    assert seen and seen[0] - before < 64 * MiB


def test_truncated_stream_rejected(monkeypatch):
    u = ClientUpdate("c", 1, many_dtypes(), {})
    raw = raw_update(u)
    monkeypatch.setattr(streams, "unpack", _never)
    with pytest.raises(WireError, match="ended after"):  # chunks missing at the end
        wire.read_update(raw[:-1], max_bytes=MiB)
    last = pb2.UpdateChunk.FromString(raw[-1])
    with pytest.raises(WireIntegrityError, match="declared"):  # the last chunk short of data
        wire.read_update([*raw[:-1], edit(raw[-1], data=last.data[:-1])], max_bytes=MiB)
    with pytest.raises(WireError, match="cannot decode"):  # a message cut mid-way
        wire.read_update([*raw[:-1], raw[-1][: len(raw[-1]) // 2]], max_bytes=MiB)
    t_raw = list(wire.instruction_to_wire(Instruction(1, "c", 0, {}, Payload(u.tensors)), "t", 256))
    with pytest.raises(WireError, match="ended after"):
        wire.read_task(t_raw[:-1], max_bytes=MiB)


def test_task_header_needs_sha256():
    ins = Instruction(1, "c", 0, {}, Payload({"a": torch.randn(100)}))
    msgs = list(wire.instruction_to_chunks(ins, "t", 128))
    msgs[0].header.sha256 = b""
    with pytest.raises(WireError, match="lacks the sha256"):
        wire.read_task(stream(msgs[0], map(_never, [0])), max_bytes=MiB)


# --- hostile safetensors blobs (what unpack sees after a matching sha256) -----------------------


def blob(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def test_hostile_blob_layouts_rejected():
    f32 = {"dtype": "F32", "shape": [2]}
    cases = {
        "gap": blob({"a": {**f32, "data_offsets": [0, 8]}, "b": {**f32, "data_offsets": [12, 20]}}, bytes(20)),
        "overlap": blob({"a": {**f32, "data_offsets": [0, 8]}, "b": {**f32, "data_offsets": [4, 12]}}, bytes(12)),
        "short": blob({"a": {**f32, "data_offsets": [0, 8]}}, bytes(7)),
        "trailing": blob({"a": {**f32, "data_offsets": [0, 8]}}, bytes(9)),
        "size": blob({"a": {**f32, "data_offsets": [0, 4]}}, bytes(4)),
        "dtype": blob({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)),
        "negative": blob({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
        "float shape": blob({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, bytes(4)),
        "extra key": blob({"a": {**f32, "data_offsets": [0, 8], "x": 1}}, bytes(8)),
        "huge": blob({"a": {"dtype": "U8", "shape": [2**61, 2**61], "data_offsets": [0, 4]}}, bytes(4)),
        "metadata": blob({"__metadata__": {"a": 1}}, b""),
        "not object": blob([], b""),  # type: ignore[arg-type]
    }
    dup = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    cases["duplicate"] = len(dup).to_bytes(8, "little") + dup + b"\0"
    for b in cases.values():
        with pytest.raises(WireError):
            unpack(b)
        with pytest.raises(WireError):
            unpack(bytearray(b))


def test_misaligned_and_odd_blobs_unpack_correctly():
    # a hand-made but valid layout: a 1-byte tensor first, so the f32 one sits at an odd offset (copied)
    x = torch.tensor([1.5, -2.25])
    b = blob({"u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
              "m": {"dtype": "BOOL", "shape": [3], "data_offsets": [9, 12]}},
             b"\x07" + x.numpy().tobytes() + b"\x00\x02\x01")
    for data in (b, bytearray(b), memoryview(bytearray(b))):
        t = unpack(data)
        assert list(t) == ["f", "m", "u"] and torch.equal(t["f"], x) and t["u"].tolist() == [7]
        assert t["m"].tolist() == [False, True, True] and t["m"].view(torch.uint8).tolist() == [0, 1, 1]
    src = bytearray(pack({"a": torch.ones(4)}))  # views of a writable buffer: no copy
    t = unpack(src)["a"]
    t.add_(1)
    assert pack({"a": torch.ones(4) * 2}) == bytes(src)


# --- receiving without copying the data out of protobuf ----------------------------------------


def _protobuf_view(cls, raw: bytes):
    try:
        m = cls.FromString(raw)
    except (DecodeError, ValueError, RuntimeError):
        return None
    return m, m.data


def test_lifted_data_agrees_with_protobuf_parse():
    """`_parse_chunk` on serialized bytes == protobuf's own parse, for our layout, protobuf's layout, a data field
    given twice, unknown fields, too many fields (protobuf path), and thousands of random mutations."""
    u = ClientUpdate("org-a", 3, {"a": torch.randn(100)}, {f"m{i}": float(i) for i in range(3)})
    ours = raw_update(u, chunk_bytes=128)
    canonical = [pb2.UpdateChunk.FromString(r).SerializeToString() for r in ours]
    twice = ours[1] + framing.varint(6 << 3 | 2) + framing.varint(3) + b"xyz"  # the last data field wins
    unknown = ours[1] + framing.varint(99 << 3) + framing.varint(5)  # unknown varint field 99
    many = pb2.UpdateChunk(task_id="t", data=b"d", metrics={f"k{i}": 1.0 for i in range(100)}).SerializeToString()
    instr = list(wire.instruction_to_wire(Instruction(1, "c", 0, {}, Payload({"a": torch.randn(50)})), "t", 100))
    cases = [(pb2.UpdateChunk, r) for r in [*ours, *canonical, twice, unknown, many]]
    cases += [(pb2.TaskChunk, r) for r in instr]
    rng = random.Random(5)
    originals = list(cases)
    for _ in range(3000):
        cls, base = originals[rng.randrange(len(originals))]
        mutated = mutate(rng, [base]) if rng.random() < 0.9 else [base[: rng.randrange(len(base))]]
        cases.append((cls, mutated[0] if mutated else b""))
    lifted = 0
    for cls, raw in cases:
        want = _protobuf_view(cls, raw)
        if want is None:
            with pytest.raises(WireError):
                framing.parse_chunk(cls, raw)
            continue
        msg, data = framing.parse_chunk(cls, raw)
        lifted += isinstance(data, memoryview)
        assert bytes(data) == want[1]
        msg.data = want[1]
        assert msg == want[0]
    assert lifted > 500  # many cases took the zero-copy path (most mutations are not valid protobuf)
    assert bytes(framing.parse_chunk(pb2.UpdateChunk, twice)[1]) == b"xyz"
    assert not isinstance(framing.parse_chunk(pb2.UpdateChunk, many)[1], memoryview)  # > 64 fields: protobuf
