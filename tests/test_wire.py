"""fedtune.transports.wire: safetensors blobs, chunked streams, limits, integrity, fuzzing."""

import hashlib
import random
import tracemalloc

import grpc
import pytest
import torch

from fedtune.algorithms.api import ClientUpdate, Instruction, Payload, payload_nbytes
from fedtune.transports import wire
from fedtune.transports.wire import fedtune_pb2 as pb2
from fedtune.transports.wire.checks import WireError, WireIntegrityError, WireLimitError
from fedtune.transports.wire.tensors import pack, pack_payload, pack_update, unpack, unpack_payload, unpack_update

MiB = 1 << 20


def bits_equal(a: dict, b: dict) -> bool:
    """Same keys, dtypes, shapes and bytes (NaN-safe)."""
    if list(a) != list(b):
        return False
    for k, x in a.items():
        y = b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.numel() and not torch.equal(
            x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
        ):
            return False
    return True


def mixed() -> dict:
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(7, 5, generator=g)
    f32[0, 0] = float("nan")
    f32[0, 1] = float("-inf")
    return {
        "b.f32": f32,
        "a.bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(9, generator=g).to(torch.float16),
        "d.i64": torch.tensor([-(2**63), 0, 2**63 - 1]),
        "e.u8": torch.arange(256, dtype=torch.uint8),
        "f.bool": torch.tensor([True, False]),
        "g.empty": torch.zeros(0, 3),
        "h.scalar": torch.tensor(3.5, dtype=torch.float64),
    }


def sorted_dict(d: dict) -> dict:
    return dict(sorted(d.items()))


def make_instruction(nbytes: int, setup: bool = True) -> Instruction:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(nbytes // 4, generator=g)
    return Instruction(
        round=7,
        client_id="org-a",
        base_version=6,
        train={"lr": 1e-3, "steps": 4, "modules": ["q", "v"]},
        sync=Payload({"lora_A": a, "lora_B": torch.ones(2, 2, dtype=torch.bfloat16)}, {"version": 6, "x": [1, 2]}),
        setup=Payload({"seeds": torch.arange(5)}, {"algorithm": "fedkseed"}) if setup else None,
    )


# --- tensors.py ------------------------------------------------------------------------------


def test_pack_unpack_bit_exact_all_dtypes():
    t = mixed()
    assert bits_equal(unpack(pack(t)), sorted_dict(t))


def test_pack_empty_and_views_and_noncontiguous():
    assert unpack(pack({})) == {}
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    t = {"view": base[1:3], "t": base.t(), "same1": base, "same2": base}  # views and shared storage
    assert bits_equal(unpack(pack(t)), sorted_dict({k: v.contiguous() for k, v in t.items()}))


def test_pack_deterministic_and_sorted():
    t = mixed()
    rev = dict(reversed(list(t.items())))
    assert pack(t) == pack(rev)
    assert list(unpack(pack(rev))) == sorted(t)


def test_payload_nbytes():
    assert payload_nbytes({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)}) == 48 + 10
    assert payload_nbytes({}) == 0


def test_payload_and_update_blob_round_trip():
    p = Payload(mixed(), {"algorithm": "flora", "ranks": [4, 8], "nested": {"a": None, "b": 1.5}})
    q = unpack_payload(pack_payload(p))
    assert q.meta == p.meta and bits_equal(q.tensors, sorted_dict(p.tensors))
    assert unpack_payload(pack_payload(Payload())) == Payload()
    u = ClientUpdate("org-b", 12, {"w": torch.randn(4)}, {"loss": 0.25, "acc": 1.0})
    v = unpack_update(pack_update(u))
    assert (v.client_id, v.num_examples, v.metrics) == ("org-b", 12, u.metrics)
    assert bits_equal(v.tensors, u.tensors)


def test_blob_errors_are_wire_errors():
    with pytest.raises(WireError, match="JSON-serializable"):
        pack_payload(Payload(meta={"t": torch.ones(1)}))
    with pytest.raises(WireError, match="lacks"):
        unpack_payload(pack({"a": torch.ones(1)}))
    with pytest.raises(WireError, match="lacks"):
        unpack_update(pack_payload(Payload()))
    bad_meta = pack_payload(Payload(meta={"k": 1})).replace(b'{\\"k\\":1}', b'{\\"k\\":1,')
    with pytest.raises(WireError, match="not valid JSON"):
        unpack_payload(bad_meta)
    for junk in [
        b"",
        b"\x01",
        b"\xff" * 8 + b"{}",
        b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
        b"\x08" + b"\x00" * 7 + b"{}",
    ]:
        with pytest.raises(WireError):
            unpack(junk)
    with pytest.raises(WireError, match="dense"):
        pack({"s": torch.eye(2).to_sparse()})


# --- chunked streams -------------------------------------------------------------------------


def test_task_chunking_3_5_mib():
    instr = make_instruction(int(3.5 * MiB) - 200)
    chunks = list(wire.instruction_to_chunks(instr, "task-1"))
    assert len(chunks) == 4
    assert all(len(c.data) <= MiB for c in chunks)
    assert [c.index for c in chunks] == [0, 1, 2, 3] and {c.total for c in chunks} == {4}
    assert chunks[0].HasField("header") and not any(c.HasField("header") for c in chunks[1:])
    task = wire.read_task(chunks, max_bytes=8 * MiB)
    assert isinstance(task, wire.Task) and task.task_id == "task-1"
    got = task.instruction
    assert (got.round, got.client_id, got.base_version, got.train) == (7, "org-a", 6, instr.train)
    assert got.sync.meta == instr.sync.meta and got.setup.meta == instr.setup.meta
    assert bits_equal(got.sync.tensors, instr.sync.tensors) and bits_equal(got.setup.tensors, instr.setup.tensors)
    # also from serialized bytes, and without a setup payload
    plain = make_instruction(1000, setup=False)
    got = wire.chunks_to_instruction(
        [c.SerializeToString() for c in wire.instruction_to_chunks(plain, "t")], max_bytes=MiB
    )
    assert got.setup is None and bits_equal(got.sync.tensors, plain.sync.tensors)


def test_update_chunking_round_trip():
    u = ClientUpdate("org-a", 40, {"a": torch.randn(int(3.5 * MiB) // 4), "b": torch.zeros(0)}, {"loss": 1.25})
    chunks = list(wire.update_to_chunks(u, "task-9"))
    assert len(chunks) == 4 and all(len(c.data) <= MiB for c in chunks)
    task_id, v = wire.read_update(
        chunks, max_bytes=4 * MiB, expected_task_id={"task-9", "x"}, expected_client_id="org-a"
    )
    assert task_id == "task-9" and (v.client_id, v.num_examples, v.metrics) == ("org-a", 40, {"loss": 1.25})
    assert bits_equal(v.tensors, u.tensors)
    empty = ClientUpdate("org-a", 0, {}, {})
    assert wire.chunks_to_update(wire.update_to_chunks(empty, "t"), max_bytes=MiB).tensors == {}


def test_wire_overhead_33mb():
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.lora_{ab}": torch.randn(33 * 10**6 // 4 // 16, generator=g) for i in range(8) for ab in "AB"}
    raw = payload_nbytes(tensors)
    assert raw >= 33 * 10**6 - 64
    up = wire.wire_bytes(wire.update_to_chunks(ClientUpdate("c", 1, tensors, {"loss": 1.0}), "task"))
    down = wire.wire_bytes(wire.instruction_to_chunks(Instruction(1, "c", 0, {}, Payload(tensors)), "task"))
    assert up / raw <= 1.01 and down / raw <= 1.01
    counter = wire.ByteCounter()
    assert (
        sum(1 for _ in counter.wrap(wire.update_to_chunks(ClientUpdate("c", 1, tensors, {"loss": 1.0}), "task"))) == 32
    )
    assert counter.bytes == up and counter.messages == 32


def _never(*_):
    raise AssertionError("reassembler read past a chunk it should have rejected")


def stream(first, rest=None):
    yield first
    if rest is not None:
        yield from rest


def test_declared_10gb_rejected_before_allocation():
    huge = 10 * 10**9
    up = pb2.UpdateChunk(task_id="t", index=0, total=10_000, total_bytes=huge, sha256=b"\0" * 32, data=b"x")
    down = pb2.TaskChunk(
        kind=pb2.TaskChunk.TASK,
        task_id="t",
        index=0,
        total=10_000,
        data=b"x",
        header=pb2.TaskHeader(total_bytes=huge, sha256=b"\0" * 32),
    )
    tracemalloc.start()
    try:
        with pytest.raises(WireLimitError, match="exceeds limit"):
            wire.read_update(stream(up, map(_never, [0])), max_bytes=64 * MiB)
        with pytest.raises(WireLimitError):
            wire.read_task(stream(down, map(_never, [0])), max_bytes=64 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB
    assert wire.status_code(WireLimitError()) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_actual_size_limit():
    u = ClientUpdate("c", 1, {"a": torch.zeros(1000)}, {})
    with pytest.raises(WireLimitError):
        wire.read_update(wire.update_to_chunks(u, "t"), max_bytes=3000)


def test_sha_mismatch():
    chunks = list(wire.update_to_chunks(ClientUpdate("c", 1, {"a": torch.randn(100)}, {}), "t", chunk_bytes=128))
    chunks[1].data = bytes([chunks[1].data[0] ^ 1]) + chunks[1].data[1:]
    with pytest.raises(WireIntegrityError, match="sha256"):
        wire.read_update(chunks, max_bytes=MiB)
    tchunks = list(wire.instruction_to_chunks(make_instruction(400), "t", chunk_bytes=128))
    tchunks[0].header.sha256 = hashlib.sha256(b"other").digest()
    with pytest.raises(WireIntegrityError):
        wire.read_task(tchunks, max_bytes=MiB)
    assert wire.status_code(WireIntegrityError()) == grpc.StatusCode.DATA_LOSS


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: [c[0], c[2], c[1], *c[3:]], "out-of-order"),
        (lambda c: [c[0], c[1], c[1], *c[2:]], "duplicate"),
        (lambda c: c[:-1], "ended after"),
        (lambda c: [c[0], *c[2:]], "missing"),
        (lambda c: [*c, c[-1]], "duplicate"),
        (lambda c: [], "empty"),
    ],
)
def test_order_duplicates_missing(edit, match):
    u = ClientUpdate("c", 1, {"a": torch.randn(200)}, {})
    with pytest.raises(WireError, match=match):
        wire.read_update(edit(list(wire.update_to_chunks(u, "t", chunk_bytes=128))), max_bytes=MiB)
    t = edit(list(wire.instruction_to_chunks(make_instruction(800), "t", chunk_bytes=128)))
    with pytest.raises(WireError):
        wire.read_task(t, max_bytes=MiB)


def test_inconsistent_chunks():
    chunks = list(wire.update_to_chunks(ClientUpdate("c", 1, {"a": torch.randn(200)}, {}), "t", chunk_bytes=128))
    for field, value in [("task_id", "other"), ("total", 99), ("total_bytes", 10**5), ("sha256", b"\1" * 32)]:
        bad = [type(c)() for c in chunks]
        for b, c in zip(bad, chunks):
            b.CopyFrom(c)
        setattr(bad[2], field, value)
        with pytest.raises(WireError, match="inconsistent"):
            wire.read_update(bad, max_bytes=MiB)
    over = [type(c)() for c in chunks]  # a chunk longer than announced: caught while receiving
    for b, c in zip(over, chunks):
        b.CopyFrom(c)
    over[-1].data += b"\0" * 1000
    with pytest.raises(WireIntegrityError, match="more data"):
        wire.read_update(over, max_bytes=MiB)


def test_permission_checks_on_first_chunk():
    u = ClientUpdate("org-a", 1, {"a": torch.randn(20)}, {})
    with pytest.raises(wire.WirePermissionError):
        wire.read_update(
            stream(next(wire.update_to_chunks(u, "t1")), map(_never, [0])), max_bytes=MiB, expected_task_id="t2"
        )
    with pytest.raises(wire.WirePermissionError):
        wire.read_update(wire.update_to_chunks(u, "t1"), max_bytes=MiB, expected_client_id="org-b")
    assert wire.status_code(wire.WirePermissionError()) == grpc.StatusCode.PERMISSION_DENIED


def test_wait_and_finished():
    assert wire.read_task(wire.wait_chunks(2.5, "round closed"), max_bytes=1) == wire.Wait(2.5, "round closed")
    assert wire.read_task(wire.finished_chunks("done"), max_bytes=1) == wire.Finished("done")
    with pytest.raises(WireError, match="expected a task"):
        wire.chunks_to_instruction(wire.finished_chunks(), max_bytes=1)
    with pytest.raises(WireError, match="after a WAIT"):
        wire.read_task([*wire.wait_chunks(1.0), *wire.wait_chunks(1.0)], max_bytes=1)
    with pytest.raises(WireError, match="kind"):
        wire.read_task([pb2.TaskChunk()], max_bytes=1)


def test_unary_dataclasses_round_trip():
    msgs = [
        wire.JoinRequest("org-a", "ab" * 32, {"algorithms": "fedavg,flora"}, "0.1.0"),
        wire.JoinReply(True, "", "ab" * 32, "demo", "flora", 5.0, wire.Limits(MiB, 64 * MiB, 4 * MiB)),
        wire.TaskRequest("org-a", None),
        wire.TaskRequest("org-a", 0),
        wire.HeartbeatRequest("org-a", "t1"),
        wire.HeartbeatReply(True, 5.0, False, True),
        wire.PushReply(False, "round closed"),
    ]
    for m in msgs:
        assert wire.from_proto(type(wire.to_proto(m)).FromString(wire.to_proto(m).SerializeToString())) == m
    with pytest.raises(TypeError):
        wire.to_proto(object())


def test_sender_side_limits():
    big_meta = make_instruction(100)
    big_meta.sync.meta = {"x": "y" * (2 * MiB)}
    with pytest.raises(WireLimitError, match="send tensors"):
        next(wire.instruction_to_chunks(big_meta, "t"))
    with pytest.raises(WireError, match="task_id"):
        next(wire.update_to_chunks(ClientUpdate("c", 1, {}, {}), ""))


# --- fuzzing ---------------------------------------------------------------------------------


def mutate(rng: random.Random, msgs: list[bytes]) -> list[bytes]:
    msgs = list(msgs)
    op = rng.randrange(7)
    i = rng.randrange(len(msgs))
    m = bytearray(msgs[i])
    if op == 0 and m:  # bit flips
        for _ in range(rng.randint(1, 4)):
            m[rng.randrange(len(m))] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        m = m[: rng.randrange(len(m) + 1)]
    elif op == 2:  # random bytes inserted
        p = rng.randrange(len(m) + 1)
        m[p:p] = rng.randbytes(rng.randint(1, 16))
    elif op == 3 and m:  # overwrite a run
        p = rng.randrange(len(m))
        m[p : p + 8] = rng.randbytes(8)
    elif op == 4:  # drop a message
        del msgs[i]
        return msgs
    elif op == 5:  # duplicate / reorder
        msgs.insert(rng.randrange(len(msgs) + 1), msgs[i])
        return msgs
    else:  # garbage message
        m = bytearray(rng.randbytes(rng.randint(0, 64)))
    msgs[i] = bytes(m)
    return msgs


def test_fuzz_streams_raise_only_wire_errors():
    rng = random.Random(1234)
    task = [
        c.SerializeToString() for c in wire.instruction_to_chunks(make_instruction(600), "task-1", chunk_bytes=256)
    ]
    upd = [
        c.SerializeToString()
        for c in wire.update_to_chunks(
            ClientUpdate("org-a", 3, {"a": torch.randn(100), "b": torch.ones(3, dtype=torch.bfloat16)}, {"loss": 1.0}),
            "task-1",
            chunk_bytes=256,
        )
    ]
    outcomes = {"ok": 0, "error": 0}
    for case in range(2000):
        try:
            if case % 2:
                wire.read_task(mutate(rng, task), max_bytes=MiB)
            else:
                wire.read_update(mutate(rng, upd), max_bytes=MiB)
            outcomes["ok"] += 1
        except WireError:
            outcomes["error"] += 1
    assert outcomes["error"] > 1500  # nearly every mutation is detected


def test_fuzz_blobs_raise_only_wire_errors():
    """Corrupted safetensors blobs (with a matching sha256, as a malicious peer would send)."""
    rng = random.Random(99)
    blob = pack_payload(Payload(mixed(), {"a": [1, 2, {"b": "c"}]}))
    header_len = 8 + int.from_bytes(blob[:8], "little")
    for case in range(1000):
        m = bytearray(blob)
        region = header_len if case % 4 else len(m)  # mostly the header: that is where parsing happens
        for _ in range(rng.randint(1, 3)):  # JSON-ish characters reach deeper than random bytes
            m[rng.randrange(region)] = rng.choice(b'0123456789",:{}[]-eE.') if case % 2 else rng.randrange(256)
        if case % 5 == 0:
            m = m[: rng.randrange(len(m))]
        try:
            unpack_payload(bytes(m))
        except WireError:
            pass
        u = ClientUpdate("c", 1, {}, {})
        chunks = list(wire.update_to_chunks(u, "t"))
        chunks[0].data, chunks[0].total_bytes, chunks[0].sha256 = (bytes(m), len(m), hashlib.sha256(m).digest())
        try:
            wire.read_update(chunks, max_bytes=MiB)
        except WireError:
            pass
