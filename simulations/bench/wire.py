"""Wire overhead and loopback throughput of fedtune's chunked gRPC streams.

1. Overhead: serialized bytes (Σ protobuf ByteSize of the chunk messages, `serde.wire_bytes`) ÷ raw tensor
   payload (Σ numel·itemsize) for an adapter-like TensorDict (~33 MB, LoRA-shaped factors of a 30-layer
   576-wide model on all 7 projections) and for a ~1 KB update (four 8×8 Fed-SB-like R matrices), both as an
   update (`update_to_chunks`) and as an instruction sync payload (`instruction_to_chunks`). Goal ≤ 1.01 for
   the large one. (gRPC adds 5 bytes of length prefix per message and HTTP/2 framing on top; not counted.)
2. Throughput on 127.0.0.1, side by side (runs alternate, median of --repeats):
   - chunked: fedtune's PushUpdate path — client `serde.update_to_chunks` (safetensors pack, sha256, 1 MiB
     chunks) → server registered with `serde.add_servicer` → `serde.read_update` (order/size/sha256 checks,
     unpack). End to end, tensors in → tensors out.
   - unary_raw: one plain gRPC unary call carrying the same packed blob (bytes in → bytes out; pack/unpack
     excluded), max message sizes raised to fit.
   - unary_pack: the unary call including safetensors pack on the client and unpack on the server (the
     like-for-like comparison with "chunked", which includes them).
   - chunked_no_net: the chunked path's serde work alone (chunk, serialize, read_update) without gRPC, to
     split the chunked path's time into serde and transport.
   MB/s = payload MB (10^6 bytes) ÷ seconds; ratio = chunked MB/s ÷ unary MB/s.

    python simulations/bench/wire.py [--mb 33] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from fedtune.algorithms.base import ClientUpdate, Instruction, Payload, payload_nbytes
from fedtune.wire import serde
from fedtune.wire.tensors import pack, unpack

HIDDEN, INTER, LAYERS = 576, 1536, 30  # SmolLM2-135M shapes
MODULES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, 192), "v_proj": (HIDDEN, 192), "o_proj": (HIDDEN, HIDDEN),
           "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
TASK_ID = "0" * 32
RAW_METHOD = "/bench.Raw/Send"


def adapter_like(mb: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """LoRA A (r×d_in) / B (d_out×r) factors on every projection of every layer, rank chosen to reach ~mb MB."""
    per_rank = LAYERS * sum(i + o for i, o in MODULES.values()) * 4
    r = max(1, round(mb * 1e6 / per_rank))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(LAYERS):
        for name, (din, dout) in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            out[f"{key}.A"] = torch.randn(r, din, generator=g)
            out[f"{key}.B"] = torch.randn(dout, r, generator=g)
    return out


def small_update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.{m}.R": torch.randn(8, 8, generator=g) for i in range(2) for m in ("q_proj", "v_proj")}


def overhead(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    payload = payload_nbytes(tensors)
    upd = ClientUpdate("client-0", 1000, tensors, {"train_loss": 1.234, "epsilon": 3.0})
    ins = Instruction(round=3, client_id="client-0", base_version=2,
                      train={"steps": 4, "batch_size": 8, "lr": 1e-3, "seed": 12345},
                      sync=Payload(tensors=tensors, meta={"version": 2}), setup=None)
    up_msgs = list(serde.update_to_chunks(upd, TASK_ID))
    down_msgs = list(serde.instruction_to_chunks(ins, TASK_ID))
    up, down = serde.wire_bytes(up_msgs), serde.wire_bytes(down_msgs)
    return {"tensors": len(tensors), "payload_bytes": payload, "safetensors_blob_bytes": len(pack(tensors)),
            "update_wire_bytes": up, "update_chunks": len(up_msgs), "update_ratio": up / payload,
            "instruction_wire_bytes": down, "instruction_chunks": len(down_msgs), "instruction_ratio": down / payload,
            "grpc_length_prefix_bytes_update": 5 * len(up_msgs)}


class StubCoordinator(serde.CoordinatorServicer):
    """Only PushUpdate, exactly as fedtune's coordinator reads it (minus auth and the round book)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.last: ClientUpdate | None = None

    def PushUpdate(self, request_iterator, context):
        with serde.abort_on_wire_error(context):
            _, self.last = serde.read_update(request_iterator, max_bytes=self.max_bytes, expected_task_id=TASK_ID)
        return serde.to_proto(serde.PushReply(True))


def start_server(max_msg: int, max_bytes: int):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=serde.channel_options(max_msg))
    stub = StubCoordinator(max_bytes)
    serde.add_servicer(server, stub)
    received = {}

    def raw_send(blob: bytes, context) -> bytes:
        received["n"] = len(blob)
        if received.get("unpack"):
            received["tensors"] = unpack(blob)
        return b"ok"

    raw = grpc.method_handlers_generic_handler("bench.Raw", {"Send": grpc.unary_unary_rpc_method_handler(raw_send)})
    server.add_generic_rpc_handlers((raw,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, stub, received


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=33.0, help="size of the large adapter-like TensorDict (MB)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="simulations/bench/results/wire.json")
    a = ap.parse_args()

    big, small = adapter_like(a.mb), small_update()
    ov = {"large": overhead(big), "small": overhead(small)}
    print(f"{'update':>8} | {'tensors':>7} | {'payload B':>12} | {'update wire B':>13} | {'ratio':>7} | "
          f"{'instr wire B':>12} | {'ratio':>7}")
    for name, o in ov.items():
        print(f"{name:>8} | {o['tensors']:>7} | {o['payload_bytes']:>12,} | {o['update_wire_bytes']:>13,} | "
              f"{o['update_ratio']:>7.4f} | {o['instruction_wire_bytes']:>12,} | {o['instruction_ratio']:>7.4f}")
    print(f"goal ≤ 1.01 for the large update: {'met' if ov['large']['update_ratio'] <= 1.01 else 'NOT met'}")

    payload = payload_nbytes(big)
    blob = pack(big)
    max_msg = len(blob) + (8 << 20)
    server, port, stub, received = start_server(max_msg, 1 << 30)
    addr = f"127.0.0.1:{port}"
    chunk_ch = grpc.insecure_channel(addr, options=serde.channel_options())  # fedtune's default 4 MiB limits
    unary_ch = grpc.insecure_channel(addr, options=serde.channel_options(max_msg))
    push = serde.CoordinatorStub(chunk_ch).PushUpdate
    raw_send = unary_ch.unary_unary(RAW_METHOD)
    update = ClientUpdate("client-0", 1000, big, {"train_loss": 1.0})

    def chunked():
        reply = push(serde.update_to_wire(update, TASK_ID), timeout=120)
        assert reply.accepted and stub.last is not None and len(stub.last.tensors) == len(big)
        stub.last = None

    def unary_raw():
        received["unpack"] = False
        assert raw_send(blob, timeout=120) == b"ok" and received["n"] == len(blob)

    def unary_pack():
        received["unpack"] = True
        assert raw_send(pack(big), timeout=120) == b"ok" and len(received.pop("tensors")) == len(big)

    def chunked_no_net():  # fedtune's serde alone: chunk (pack, sha256, split) → serialize → read_update
        raw = list(serde.update_to_wire(update, TASK_ID))
        _, u = serde.read_update(raw, max_bytes=1 << 30, expected_task_id=TASK_ID)
        assert len(u.tensors) == len(big)

    paths = {"chunked": chunked, "unary_raw": unary_raw, "unary_pack": unary_pack, "chunked_no_net": chunked_no_net}
    for fn in paths.values():  # warm-up: connections, allocator
        fn()
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(a.repeats):
        for name, fn in paths.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    chunk_ch.close()
    unary_ch.close()
    server.stop(0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mbps = {k: payload / 1e6 / v for k, v in med.items()}
    res = {"overhead": ov, "throughput": {
        "payload_bytes": payload, "blob_bytes": len(blob), "repeats": a.repeats, "median_s": med, "MB_per_s": mbps,
        "ratio_chunked_over_unary_raw": mbps["chunked"] / mbps["unary_raw"],
        "ratio_chunked_over_unary_pack": mbps["chunked"] / mbps["unary_pack"], "samples_s": times},
        "threads": torch.get_num_threads()}
    print(f"\nloopback, {payload / 1e6:.1f} MB payload, median of {a.repeats}:")
    for k in paths:
        print(f"  {k:>10}: {med[k] * 1e3:8.1f} ms  {mbps[k]:8.1f} MB/s")
    print(f"  ratio chunked/unary_raw {res['throughput']['ratio_chunked_over_unary_raw']:.3f} | "
          f"chunked/unary_pack {res['throughput']['ratio_chunked_over_unary_pack']:.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
