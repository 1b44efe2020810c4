"""Compact update record (small updates: raw bytes + a RawTensor list, no safetensors header): exact serialized
sizes of Fed-SB and FedKSeed uploads counted by hand, bit-exact round trips, malformed records refused."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import fresh

from fedtune.algorithms import ClientUpdate, TrainContext, get_algorithm
from fedtune.algorithms.api import payload_nbytes, validate_update
from fedtune.algorithms.fedkseed import FedKSeedConfig
from fedtune.transports import wire
from fedtune.transports.wire import fedtune_pb2 as pb2
from fedtune.transports.wire import sizes
from fedtune.transports.wire.checks import WireError
from fedtune.transports.wire.tensors import pack

TASK = "0" * 32  # sizes.update_bytes counts with a 32-char task id, like the coordinator's uuid4 hex
MiB = 1 << 20


def varint(n: int) -> int:
    return max(1, -(-n.bit_length() // 7))


def fixed_fields(payload: int, client_id: str, num_examples: int) -> int:
    """Bytes of a one-chunk UpdateChunk besides the payload, metrics and raw_tensors, by hand (proto3: 1-byte tags, varint
    lengths; index 0 is not serialized)."""
    return ((2 + 32)  # task_id
            + 2  # total = 1
            + 1 + varint(payload)  # total_bytes
            + (2 + 32)  # sha256
            + 1 + varint(payload)  # data: tag + length (the payload bytes are counted by the caller)
            + (2 + len(client_id))
            + 1 + varint(num_examples))


TRAIN_LOSS = 2 + (2 + len("train_loss")) + 9  # map entry: tag + len, key field, double field


def pairs_records(tau: int) -> int:
    """RawTensor entries of a FedKSeed update: entry tag/len + name + dtype enum + packed shape [τ]."""
    shape = 2 + varint(tau)
    return (2 + (2 + len("grad")) + 2 + shape) + (2 + (2 + len("seed_idx")) + 2 + shape)


def read_back(update: ClientUpdate) -> ClientUpdate:
    return wire.chunks_to_update([c.SerializeToString() for c in wire.update_to_chunks(update, TASK)], max_bytes=MiB)


def test_fedkseed_upload_is_pairs_plus_a_few_fields(ktok, kfeats):
    """A real client's τ-step update: τ·8 B of pairs + the fixed fields + train_loss (the only metric when nothing
    was clamped or skipped) + two RawTensor entries. At τ = 200: 1,600 + 88 + 23 + 32 = 1,743 B, ratio 1.089 (was
    1,933 B = 1.208 with a safetensors header and four metrics)."""
    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=4096, lr=1e-3))
    state = algo.initialize(fresh(ktok), seed=0)
    client = algo.make_client()
    model = client.setup(fresh(ktok), algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    base = {"steps": 4, "batch_size": 1, "lr": 1.0, "seed": 0}
    cfg = dict(algo.configure_round(1, state, ["client-0"], base, ["client-0"])["client-0"], seed=123456789)
    upd = client.train(model, TrainContext("client-0", kfeats[:50], ktok.pad_token_id), cfg)
    assert payload_nbytes(upd.tensors) == 4 * 8 and set(upd.metrics) == {"train_loss"}
    assert sizes.update_bytes(upd) == fixed_fields(32, "client-0", 50) + 32 + TRAIN_LOSS + pairs_records(4) == 171
    back = read_back(upd)
    assert back.metrics == upd.metrics and back.num_examples == 50
    assert all(torch.equal(back.tensors[k], upd.tensors[k]) and back.tensors[k].dtype == upd.tensors[k].dtype
               for k in ("seed_idx", "grad"))
    validate_update(algo.expected_update(state, cfg), back)
    # τ = 200, same structure (200 real steps take minutes on a busy CPU; the layout does not depend on values)
    g = torch.Generator().manual_seed(0)
    big = ClientUpdate("client-0", 50, {"seed_idx": torch.randint(0, 4096, (200,), dtype=torch.int32, generator=g),
                                        "grad": torch.randn(200, generator=g)}, dict(upd.metrics))
    want = fixed_fields(1600, "client-0", 50) + 1600 + TRAIN_LOSS + pairs_records(200)
    assert want == 1743 and sizes.update_bytes(big) == want and want / 1600 <= 1.1
    validate_update(algo.expected_update(state, dict(cfg, steps=200)), read_back(big))


def test_fedkseed_sends_zo_counters_only_when_nonzero(ktok, kfeats):
    """A clamped step shows up as zo_clipped_frac; zo_skipped_steps stays absent (= 0)."""
    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=64, lr=1e-3, grad_clip=1e-9))
    state = algo.initialize(fresh(ktok), seed=0)
    client = algo.make_client()
    model = client.setup(fresh(ktok), algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    cfg = algo.configure_round(1, state, ["a"], {"steps": 3, "batch_size": 2, "seed": 1}, ["a"])["a"]
    upd = client.train(model, TrainContext("a", kfeats[:8], ktok.pad_token_id), cfg)
    assert upd.metrics["zo_clipped_frac"] == 1.0 and set(upd.metrics) == {"train_loss", "zo_clipped_frac"}
    assert read_back(upd).metrics == upd.metrics


def test_fedsb_smollm2_shaped_upload_is_payload_plus_123_bytes():
    """SmolLM2-135M, q,v on 30 layers, r = 8: one "R" [60, 8, 8] = 15,360 B; + 88 fixed + 23 train_loss
    + 12 for the RawTensor entry = 15,483 B, ratio 1.008 (60 separate tensors in safetensors: 21,138 B, 1.376)."""
    R = torch.randn(60, 8, 8, generator=torch.Generator().manual_seed(0))
    upd = ClientUpdate("client-0", 50, {"R": R}, {"train_loss": 2.5})
    raw = 2 + (2 + 1) + 2 + (2 + 3)  # entry tag/len, name "R", dtype enum, packed shape [60, 8, 8]
    want = fixed_fields(15360, "client-0", 50) + 15360 + TRAIN_LOSS + raw
    assert want == 15483 and sizes.update_bytes(upd) == want and want / 15360 <= 1.05
    assert torch.equal(read_back(upd).tensors["R"], R)
    # the same R as 60 named tensors (the old layout) in safetensors, for scale: the headers were a third
    old = {f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj.R": R[i].clone() for i in range(60)}
    assert len(pack(old)) - 15360 > 5000


def test_fedsb_client_update_round_trips_as_one_packed_tensor(tiny_fedsb_round):
    upd = tiny_fedsb_round
    assert list(upd.tensors) == ["R"] and upd.tensors["R"].shape == (4, 4, 4)  # 2 layers × q,v; r = 4
    chunk0 = next(wire.update_to_chunks(upd, TASK))
    assert [(r.name, list(r.shape)) for r in chunk0.raw_tensors] == [("R", [4, 4, 4])]
    assert len(chunk0.data) == 256  # raw float32 bytes, no header
    assert torch.equal(read_back(upd).tensors["R"], upd.tensors["R"])


@pytest.fixture(scope="module")
def tiny_fedsb_round():
    from fedtune.algorithms.fedsb import FedSBConfig
    from fedtune.data import ChatFormatter, load_chatterbot
    from fedtune.models import load_model

    base, tok = load_model("tiny")
    feats = ChatFormatter(tok, max_seq_len=32).many(load_chatterbot()[:20])
    algo = get_algorithm("fedsb", FedSBConfig(rank=4))
    st = algo.initialize(base, seed=0)
    cl = algo.make_client()
    model = cl.setup(base, algo.setup_payload(st))
    cl.sync(model, algo.sync_payload(st, -1))
    return cl.train(model, TrainContext("a", feats, tok.pad_token_id), {"steps": 1, "lr": 1e-2, "batch_size": 4})


def test_large_updates_stay_safetensors():
    big = {"a": torch.zeros(wire.COMPACT_MAX_BYTES // 4 + 1)}
    chunk0 = next(wire.update_to_chunks(ClientUpdate("c", 1, big, {}), TASK))
    assert not chunk0.raw_tensors and chunk0.data == pack(big)[: len(chunk0.data)]
    edge = {"a": torch.zeros(wire.COMPACT_MAX_BYTES // 4)}
    assert next(wire.update_to_chunks(ClientUpdate("c", 1, edge, {}), TASK)).raw_tensors
    assert not next(wire.update_to_chunks(ClientUpdate("c", 1, {}, {}), TASK)).raw_tensors  # empty: safetensors


def test_mixed_dtypes_and_empty_tensors_round_trip_bit_exactly():
    t = {"f": torch.randn(3, 2), "h": torch.randn(5).bfloat16(), "i": torch.arange(4, dtype=torch.int64),
         "b": torch.tensor([True, False]), "e": torch.zeros(0, 3), "s": torch.tensor(7, dtype=torch.int8)}
    back = read_back(ClientUpdate("c", 1, t, {})).tensors
    assert list(back) == sorted(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


def _forged(records, blob: bytes, chunks: int = 1) -> list[bytes]:
    """A stream a malicious peer would send: consistent sizes and a matching sha256, a crafted record list."""
    step = max(1, -(-len(blob) // chunks))
    parts = [blob[i : i + step] for i in range(0, len(blob), step)]
    out = []
    for i, data in enumerate(parts):
        m = pb2.UpdateChunk(task_id="t", index=i, total=len(parts), total_bytes=len(blob),
                                  sha256=hashlib.sha256(blob).digest(), data=data)
        if i == 0:
            m.client_id, m.num_examples = "c", 1
            m.raw_tensors.extend(records)
        out.append(m)
    return [m.SerializeToString() for m in out]


RT = pb2.RawTensor


@pytest.mark.parametrize("records, blob, match", [
    ([RT(name="a", dtype=RT.F32, shape=[4])], b"\0" * 12, "tensors take 16 bytes, the stream declares 12"),
    ([RT(name="a", dtype=RT.F32, shape=[2])], b"\0" * 12, "tensors take 8 bytes"),
    ([RT(name="a", dtype=RT.DTYPE_UNSPECIFIED, shape=[3])], b"\0" * 12, "unknown dtype 0"),
    ([RT(name="a", dtype=99, shape=[3])], b"\0" * 12, "unknown dtype 99"),
    ([RT(name="a", dtype=RT.F32, shape=[1]), RT(name="a", dtype=RT.F32, shape=[2])], b"\0" * 12, "duplicate"),
    ([RT(name="", dtype=RT.F32, shape=[3])], b"\0" * 12, "empty, too long or duplicate"),
    ([RT(name="a", dtype=RT.U8, shape=[1] * 17)], b"\0", "17 dimensions"),
    ([RT(name="a", dtype=RT.U8, shape=[1]), RT(name="b", dtype=RT.U8, shape=[0, 2**63 + 5])], b"\0", "≥ 2\\^48"),
    ([RT(name="a", dtype=RT.F32, shape=[2**40, 2**40])], b"\0" * 12, "the stream declares 12"),
    ([RT(name="a", dtype=RT.BOOL, shape=[3])], b"\0\1\2", "bool tensor 'a' holds bytes other than 0 and 1"),
])
def test_malformed_compact_records_are_refused(records, blob, match):
    with pytest.raises(WireError, match=match):
        wire.read_update(_forged(records, blob), max_bytes=MiB)


def test_compact_record_checks_before_buffering_and_only_on_chunk_0():
    ok = [RT(name="a", dtype=RT.F32, shape=[64])]
    first, *rest = _forged(ok, b"\0" * 256, chunks=4)
    bad = [RT(name="a", dtype=RT.F32, shape=[65])]

    def only_chunk_0():
        yield _forged(bad, b"\0" * 256, chunks=4)[0]
        raise AssertionError("read past chunk 0")

    with pytest.raises(WireError, match="tensors take 260 bytes"):
        wire.read_update(only_chunk_0(), max_bytes=MiB)
    later = pb2.UpdateChunk.FromString(rest[0])
    later.raw_tensors.extend(ok)
    with pytest.raises(WireError, match="chunk 0 only"):
        wire.read_update([first, later.SerializeToString(), *rest[1:]], max_bytes=MiB)
    assert wire.read_update([first, *rest], max_bytes=MiB)[1].tensors["a"].shape == (64,)
