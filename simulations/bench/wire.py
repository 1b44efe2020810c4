"""Wire overhead and loopback throughput of fedtune's chunked gRPC streams.

1. Overhead: serialized bytes (Σ protobuf ByteSize of the chunk messages, `wire.wire_bytes`) ÷ raw tensor
   payload (Σ numel·itemsize) for an adapter-like TensorDict (~33 MB, LoRA-shaped factors of a 30-layer
   576-wide model on all 7 projections) and for a ~1 KB update (four 8×8 Fed-SB-like R matrices), both as an
   update (`update_to_chunks`) and as an instruction sync payload (`instruction_to_chunks`). Goal ≤ 1.01 for
   the large one. (gRPC adds 5 bytes of length prefix per message and HTTP/2 framing on top; not counted.)
2. Throughput on 127.0.0.1, side by side (runs alternate, median of --repeats), one process (client and
   server share the CPUs, as on one machine):
   - chunked: fedtune's PushUpdate path — client `wire.update_to_wire` (1 MiB chunks serialized straight from
     the tensors' memory, sha256 while streaming) → server registered with `wire.add_servicer` →
     `wire.read_update` (order/size checks, sha256 per chunk into one buffer, compare, zero-copy unpack). End to
     end, tensors in → tensors out, fedtune's default 4 MiB message limits.
   - chunked_before: the same path as it was before (kept here as a reference implementation): safetensors.torch
     save, sha256 of the blob, 1 MiB chunk copies, protobuf messages; the server joins the chunks, hashes the
     blob, safetensors.torch.load.
   - unary_raw: one plain gRPC unary call carrying the same packed blob (bytes in → bytes out; pack/unpack
     excluded), max message sizes raised to fit.
   - unary_pack: the unary call including pack on the client and unpack on the server (fedtune's
     `wire.tensors` pack/unpack; unary_pack_before: safetensors.torch save/load).
   - unary_pack_sha: unary_pack plus a sha256 of the blob on each side (the unary call with chunked's safety).
   - chunked_no_net: the chunked path's serde work alone (update_to_wire, read_update) without gRPC, to split
     the chunked path's time into serde and transport.
   MB/s = payload MB (10^6 bytes) ÷ wall seconds; CPU ms = process CPU time of the call (all threads: client,
   server, gRPC); ratio = chunked MB/s ÷ other MB/s (wall), and other CPU ÷ chunked CPU (on a loaded machine the
   CPU ratio is the steadier of the two). Bound: unary_raw's CPU time plus the work it leaves out (pack, unpack,
   one sha256 per side; measured in 3), spread perfectly over this machine's CPUs, is the least wall time any
   tensors-in → tensors-out path that keeps sha256 end to end can take here; unary_raw's wall ÷ that is the
   best chunked/unary_raw ratio such a path can reach.
3. Profile of the chunked path's serde stages, one after another in one thread (thread CPU time, best of
   --repeats), to show
   where its time goes: pack_parts, sender sha256, chunk serialization (the one copy), receiver parse (data left
   in place) + copy into the buffer, receiver sha256, unpack; and, for reference, what protobuf's own parse +
   `.data` would cost instead.

    python simulations/bench/wire.py [--mb 33] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import time
from concurrent import futures
from pathlib import Path

import grpc
import safetensors.torch
import torch

from fedtune.algorithms.api import ClientUpdate, Instruction, Payload, payload_nbytes
from fedtune.transports import wire
from fedtune.transports.wire import fedtune_pb2 as pb2
from fedtune.transports.wire import framing
from fedtune.transports.wire.tensors import pack, pack_parts, unpack

HIDDEN, INTER, LAYERS = 576, 1536, 30  # SmolLM2-135M shapes
MODULES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, 192), "v_proj": (HIDDEN, 192), "o_proj": (HIDDEN, HIDDEN),
           "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
TASK_ID = "0" * 32
RAW_METHOD = "/bench.Raw/Send"
BEFORE_METHOD = "/bench.Before/PushUpdate"


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
    up_msgs = list(wire.update_to_chunks(upd, TASK_ID))
    down_msgs = list(wire.instruction_to_chunks(ins, TASK_ID))
    up, down = wire.wire_bytes(up_msgs), wire.wire_bytes(down_msgs)
    return {"tensors": len(tensors), "payload_bytes": payload, "safetensors_blob_bytes": len(pack(tensors)),
            "update_wire_bytes": up, "update_chunks": len(up_msgs), "update_ratio": up / payload,
            "instruction_wire_bytes": down, "instruction_chunks": len(down_msgs), "instruction_ratio": down / payload,
            "grpc_length_prefix_bytes_update": 5 * len(up_msgs)}


class StubCoordinator(wire.CoordinatorServicer):
    """Only PushUpdate, exactly as fedtune's coordinator reads it (minus auth and the round book)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.last: ClientUpdate | None = None

    def PushUpdate(self, request_iterator, context):
        with wire.abort_on_wire_error(context):
            _, self.last = wire.read_update(request_iterator, max_bytes=self.max_bytes, expected_task_id=TASK_ID)
        return wire.to_proto(wire.PushReply(True))


# --- the chunked path before (reference; same checks, the old data handling) -------------------------------


def before_chunks(update: ClientUpdate, task_id: str, chunk_bytes: int = wire.CHUNK_BYTES):
    blob = safetensors.torch.save(update.tensors)
    digest = hashlib.sha256(blob).digest()
    total, view = max(1, math.ceil(len(blob) / chunk_bytes)), memoryview(blob)
    for i in range(total):
        msg = pb2.UpdateChunk(task_id=task_id, index=i, total=total, total_bytes=len(blob), sha256=digest,
                                    data=bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes]))
        if i == 0:
            msg.client_id, msg.num_examples = update.client_id, update.num_examples
            msg.metrics.update(update.metrics)
        yield msg


def before_unpack(blob: bytes) -> dict[str, torch.Tensor]:
    return dict(sorted(safetensors.torch.load(blob).items()))


def before_read(chunks, max_bytes: int) -> ClientUpdate:
    parts, received, first = [], 0, None
    for raw in chunks:
        c = pb2.UpdateChunk.FromString(raw)
        first = first or c
        if c.total_bytes > max_bytes or c.index != len(parts) or c.sha256 != first.sha256 or c.task_id != TASK_ID:
            raise wire.WireError("bad chunk")
        received += len(c.data)
        if received > c.total_bytes:
            raise wire.WireError("too much data")
        parts.append(c.data)
    blob = b"".join(parts)
    if len(parts) != first.total or hashlib.sha256(blob).digest() != first.sha256:
        raise wire.WireError("bad stream")
    return ClientUpdate(first.client_id, first.num_examples, before_unpack(blob), dict(first.metrics))


def start_server(max_msg: int, max_bytes: int):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=wire.channel_options(max_msg))
    stub = StubCoordinator(max_bytes)
    wire.add_servicer(server, stub)
    received = {}

    def raw_send(blob: bytes, context) -> bytes:
        received["n"] = len(blob)
        if received.get("sha") is not None and hashlib.sha256(blob).digest() != received["sha"]:
            raise ValueError("sha256 mismatch")
        if received.get("unpack"):
            received["tensors"] = received["unpack"](blob)
        return b"ok"

    def before_push(request_iterator, context) -> bytes:
        stub.last = before_read(request_iterator, max_bytes)
        return wire.to_proto(wire.PushReply(True)).SerializeToString()

    raw = grpc.method_handlers_generic_handler("bench.Raw", {"Send": grpc.unary_unary_rpc_method_handler(raw_send)})
    before = grpc.method_handlers_generic_handler(
        "bench.Before", {"PushUpdate": grpc.stream_unary_rpc_method_handler(before_push)})
    server.add_generic_rpc_handlers((raw, before))
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
    chunk_ch = grpc.insecure_channel(addr, options=wire.channel_options())  # fedtune's default 4 MiB limits
    unary_ch = grpc.insecure_channel(addr, options=wire.channel_options(max_msg))
    push = wire.CoordinatorStub(chunk_ch).PushUpdate
    raw_send = unary_ch.unary_unary(RAW_METHOD)
    update = ClientUpdate("client-0", 1000, big, {"train_loss": 1.0})

    push_before = chunk_ch.stream_unary(BEFORE_METHOD, request_serializer=pb2.UpdateChunk.SerializeToString)

    def check(tensors: dict[str, torch.Tensor]) -> None:
        assert list(tensors) == sorted(big) and tensors[last_key].shape == big[last_key].shape

    last_key = max(big)

    def chunked():
        reply = push(wire.update_to_wire(update, TASK_ID), timeout=120)
        assert reply.accepted and stub.last is not None
        check(stub.last.tensors)
        stub.last = None

    def chunked_before():
        assert push_before(before_chunks(update, TASK_ID), timeout=120)
        check(stub.last.tensors)
        stub.last = None

    def unary(payload_blob: bytes, unpack_fn=None, sha: bool = False) -> None:
        received["unpack"] = unpack_fn
        received["sha"] = hashlib.sha256(payload_blob).digest() if sha else None
        assert raw_send(payload_blob, timeout=120) == b"ok" and received["n"] == len(payload_blob)
        if unpack_fn is not None:
            check(received.pop("tensors"))

    def chunked_no_net():  # fedtune's serde alone: update_to_wire → read_update
        _, u = wire.read_update(list(wire.update_to_wire(update, TASK_ID)), max_bytes=1 << 30,
                                 expected_task_id=TASK_ID)
        check(u.tensors)

    paths = {"chunked": chunked, "chunked_before": chunked_before, "unary_raw": lambda: unary(blob),
             "unary_pack": lambda: unary(pack(big), unpack),
             "unary_pack_sha": lambda: unary(pack(big), unpack, sha=True),
             "unary_pack_before": lambda: unary(safetensors.torch.save(big), before_unpack),
             "chunked_no_net": chunked_no_net}
    for fn in paths.values():  # warm-up: connections, allocator
        fn()
    times: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(a.repeats):
        for name, fn in paths.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    chunk_ch.close()
    unary_ch.close()
    server.stop(0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    mbps = {k: payload / 1e6 / v for k, v in med.items()}
    ratios = {f"{c}/{k}": mbps[c] / mbps[k] for c in ("chunked", "chunked_before")
              for k in ("unary_raw", "unary_pack", "unary_pack_sha", "unary_pack_before")}
    ratios["chunked/chunked_before"] = mbps["chunked"] / mbps["chunked_before"]
    # the same ratios on process CPU time (other ÷ chunked): what a loaded machine's wall times cannot show
    cpu_ratios = {k: med_cpu[k.split("/")[1]] / med_cpu[k.split("/")[0]] for k in ratios}
    prof = profile(update, a.repeats)
    # The floor for any tensors-in → tensors-out path that keeps sha256 end to end: the raw call's CPU plus what
    # it leaves out (pack on the sender, unpack on the receiver, one hash per side), spread perfectly over every
    # CPU of this machine (sender and receiver share them in a loopback run).
    cpus = len(os.sched_getaffinity(0))
    extra_ms = sum(prof[k] for k in ("sender pack_parts", "sender sha256", "receiver sha256", "receiver unpack (views)"))
    floor_s = (med_cpu["unary_raw"] + extra_ms / 1e3) / cpus
    bound = {"cpus": cpus, "floor_wall_s": floor_s, "best_possible_ratio": med["unary_raw"] / floor_s}
    res = {"overhead": ov, "sha256_bound": bound, "throughput": {
        "payload_bytes": payload, "blob_bytes": len(blob), "repeats": a.repeats, "median_s": med,
        "median_cpu_s": med_cpu, "MB_per_s": mbps, "ratios": ratios, "cpu_ratios": cpu_ratios,
        "ratio_chunked_over_unary_raw": ratios["chunked/unary_raw"],
        "ratio_chunked_over_unary_pack": ratios["chunked/unary_pack"], "samples_s": times, "samples_cpu_s": cpu},
        "profile_ms": prof, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    print(f"\nloopback, {payload / 1e6:.1f} MB payload, median of {a.repeats} (CPU = process CPU time, all threads):")
    for k in paths:
        print(f"  {k:>18}: {med[k] * 1e3:8.1f} ms wall {med_cpu[k] * 1e3:8.1f} ms CPU {mbps[k]:8.1f} MB/s")
    print(f"  {'ratio':<34} {'wall':>6} {'CPU':>6}   (wall: MB/s ÷ MB/s; CPU: CPU time of the other ÷ this one)")
    for k, r in ratios.items():
        print(f"    {k:<32} {r:6.3f} {cpu_ratios[k]:6.3f}")
    goal = ratios["chunked/unary_raw"]
    print(f"  goal chunked/unary_raw ≥ 0.8: {'met' if goal >= 0.8 else 'NOT met'} ({goal:.3f}; before "
          f"{ratios['chunked_before/unary_raw']:.3f})")
    print(f"  bound: unary_raw CPU + pack + 2 × sha256 + unpack over {cpus} CPUs = {floor_s * 1e3:.1f} ms wall at best "
          f"→ chunked/unary_raw ≤ {bound['best_possible_ratio']:.3f} for any path keeping sha256 end to end here")
    print("\nchunked serde stages, serially in one thread (thread CPU ms, best of repeats):")
    for k, v in prof.items():
        print(f"  {k:>28}: {v:7.1f} ms")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


def profile(update: ClientUpdate, repeats: int) -> dict[str, float]:
    """The chunked path's stages one after another (ms, best of `repeats`): where its CPU time goes."""
    out: dict[str, float] = {}

    def stage(name, fn):
        best = math.inf
        for _ in range(max(1, repeats)):
            t = time.thread_time()
            r = fn()
            best = min(best, time.thread_time() - t)
        out[name] = best * 1e3
        return r

    parts = stage("sender pack_parts", lambda: pack_parts(update.tensors))

    def sha(pieces):
        d = hashlib.sha256()
        for p in pieces:
            d.update(p)
        return d.digest()

    stage("sender sha256", lambda: sha(parts))
    raw = stage("sender update_to_wire (all)", lambda: list(wire.update_to_wire(update, TASK_ID)))
    stage("(protobuf parse + .data: 2 copies)", lambda: [pb2.UpdateChunk.FromString(r).data for r in raw])
    lifted = stage("receiver parse (data as views)", lambda: [framing.parse_chunk(pb2.UpdateChunk, r) for r in raw])
    data = [d for _, d in lifted]

    def fill():
        buf = memoryview(torch.empty(sum(map(len, data)), dtype=torch.uint8).numpy())
        pos = 0
        for d in data:
            buf[pos : pos + len(d)] = d
            pos += len(d)
        return buf

    buf = stage("receiver copy into buffer", fill)
    stage("receiver sha256", lambda: sha(data))
    stage("receiver unpack (views)", lambda: unpack(buf))
    stage("receiver read_update (all)", lambda: wire.read_update(raw, max_bytes=1 << 30))
    return out


if __name__ == "__main__":
    main()
