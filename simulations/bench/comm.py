"""Communication vs quality: FedAvg-LoRA, FLoRA and Fed-SB on the chatterbot demo, same settings.

All three use the same targets (q_proj, v_proj), the same rank r (FLoRA with equal ranks on every client,
alpha = 2r like LoRA; Fed-SB's scale is fixed to 1 by the method), the same seed, clients, rounds, local
steps, batch, lr and data. Per method: bytes up / down per client-round (serialized = protobuf chunk
messages exactly as the gRPC transport sends them; payload = raw tensor bytes), the Fed-SB / LoRA upload
ratio, eval loss per round (round 0 = base model) and wall time. Methods run one after another in this
process (never concurrently).

Fed-SB trains only r² parameters per module, so with the LoRA lr it may barely move in a few steps;
`--fedsb-tuned-lr X` adds a "fedsb@lr=X" line (a single extra run, not a sweep).

`--wire-only` (seconds, no model, no training) measures just the serialized ÷ payload ratios of the small
uploads, before and after side by side (issue 15): Fed-SB with SmolLM2-135M shapes (q_proj, v_proj on 30
layers, rank --rank) — before: 60 tensors "<module>.R" in a safetensors blob, after: one "R" [60, r, r] in
the compact record — upload and round-2 download (the sync payload: the global R); FedKSeed at τ = --tau —
before: "seed_idx"/"grad" in safetensors plus the four client metrics, after: the compact record plus
train_loss (zo_* counters only when nonzero). Same messages the gRPC transport sends (32-char task id).

    python simulations/bench/comm.py [--model smollm2|tiny] [--rounds 2] [--local-steps 4] [--clients 4]
        [--rank 8] [--lr 1e-3] [--seq 64] [--eval-per-client 16] [--fedsb-tuned-lr 1e-2]
    python simulations/bench/comm.py --wire-only [--rank 8] [--tau 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from fedtune import config
from fedtune.run.assemble import simulate

DEMO = "simulations/demo.toml"


def base_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """The shared workload of every bench script (chatterbot demo, shrunk to CLI sizes)."""
    return {
        "model.name": a.model, "run.seed": a.seed, "run.rounds": a.rounds, "federation.num_clients": a.clients,
        "federation.min_clients": 1, "train.local_steps": a.local_steps, "train.batch_size": a.batch,
        "train.lr": a.lr, "data.max_seq_len": a.seq, "data.max_eval_per_client": a.eval_per_client,
        "lora.rank": a.rank, "lora.alpha": 2 * a.rank, "lora.target_modules": ["q_proj", "v_proj"],
        # FLoRA: equal ranks everywhere, same scale alpha/r = 2 as LoRA
        "flora.ranks": [], "flora.rank": a.rank, "flora.alpha": 2 * a.rank,
    }


def add_workload_args(ap: argparse.ArgumentParser, **defaults: Any) -> None:
    d = {"model": "smollm2", "seed": 0, "rounds": 2, "clients": 4, "local_steps": 4, "batch": 8, "lr": 1e-3,
         "seq": 64, "eval_per_client": 16, "rank": 8} | defaults
    ap.add_argument("--model", default=d["model"], help='"smollm2" (real) or "tiny" (random, seconds)')
    ap.add_argument("--seed", type=int, default=d["seed"])
    ap.add_argument("--rounds", type=int, default=d["rounds"])
    ap.add_argument("--clients", type=int, default=d["clients"])
    ap.add_argument("--local-steps", type=int, default=d["local_steps"])
    ap.add_argument("--batch", type=int, default=d["batch"])
    ap.add_argument("--lr", type=float, default=d["lr"])
    ap.add_argument("--seq", type=int, default=d["seq"], help="data.max_seq_len")
    ap.add_argument("--eval-per-client", type=int, default=d["eval_per_client"])
    ap.add_argument("--rank", type=int, default=d["rank"])
    ap.add_argument("--work", default="runs/bench", help="scratch dir for run outputs (deleted per run)")


def run_method(algorithm: str, overrides: dict[str, Any], work: str, tag: str) -> dict[str, Any]:
    """One simulated run; returns the summary's key figures plus the per-round metrics rows."""
    out = Path(work) / tag
    shutil.rmtree(out, ignore_errors=True)
    cfg = config.load(DEMO, dict(overrides, **{"run.algorithm": algorithm, "run.out": str(out), "run.name": tag}),
                      other_methods=True)  # demo.toml's [flora] serves every method here
    t = time.perf_counter()
    summary = simulate(cfg, progress=False)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"algorithm": algorithm, "tag": tag, "wall_s": wall, "summary": {
        k: summary.get(k) for k in ("rounds_completed", "stopped_early", "epsilon", "delta", "eval_loss_first",
                                    "eval_loss_final", "bytes_up_total", "bytes_down_total")}, "rows": rows}


def per_client_round(rows: list[dict[str, Any]], key: str) -> float:
    """Mean over training rounds of row[key] / clients_completed."""
    vals = [r[key] / r["clients_completed"] for r in rows if r["round"] > 0 and r.get("clients_completed")]
    return sum(vals) / len(vals) if vals else float("nan")


def comm_row(res: dict[str, Any]) -> dict[str, Any]:
    rows = res["rows"]
    last = rows[-1]
    return {
        "method": res["tag"],
        "payload_up": per_client_round(rows, "payload_bytes_up"), "bytes_up": per_client_round(rows, "bytes_up"),
        "payload_down": per_client_round(rows, "payload_bytes_down"),
        "bytes_down": per_client_round(rows, "bytes_down"),
        "bytes_down_by_round": [r["bytes_down"] / r["clients_completed"] for r in rows
                                if r["round"] > 0 and r.get("clients_completed")],  # round 1 includes setup
        "eval_loss": [r.get("eval_loss") for r in rows],
        "train_loss": [r.get("train_loss") for r in rows if r["round"] > 0],
        "fedsb_vs_lora_upload_ratio": last.get("fedsb_vs_lora_upload_ratio"),
        "round_wall_s": [r.get("wall_s") for r in rows if r["round"] > 0],
        "wall_s": res["wall_s"],
    }


def print_table(table: list[dict[str, Any]], ref: str = "fedavg") -> None:
    ref_up = next((t["payload_up"] for t in table if t["method"] == ref), None)
    print(f"{'method':>16} | {'up payload B':>12} | {'up wire B':>11} | {'down wire B':>11} | "
          f"{'down r1/last':>17} | {'up ÷ ' + ref:>12} | {'eval loss per round (0 = base)':<34} | {'wall s':>7}")
    for t in table:
        ratio = t["payload_up"] / ref_up if ref_up else float("nan")
        ev = " ".join(f"{v:.4f}" for v in t["eval_loss"])
        print(f"{t['method']:>16} | {t['payload_up']:>12,.0f} | {t['bytes_up']:>11,.0f} | {t['bytes_down']:>11,.0f} | "
              f"{t['bytes_down_by_round'][0]:>8,.0f}/{t['bytes_down_by_round'][-1]:<8,.0f} | {ratio:>12.4f} | {ev:<34} | {t['wall_s']:>7.1f}")


SMOLLM2_QV = {"q_proj": (576, 576), "v_proj": (192, 576)}  # (d_out, d_in), 30 layers
SMOLLM2_LAYERS = 30


def wire_only(rank: int, tau: int, num_seeds: int = 4096) -> list[dict[str, Any]]:
    """Serialized upload (and Fed-SB download) bytes ÷ payload, before and after the packed R / compact record."""
    import torch

    from fedtune.algorithms import get_algorithm
    from fedtune.algorithms.api import ClientUpdate, GlobalState, Instruction, payload_nbytes
    from fedtune.algorithms.fedkseed import FedKSeedConfig
    from fedtune.algorithms.fedsb import FedSBConfig
    from fedtune.transports import wire

    task = "0" * 32
    g = torch.Generator().manual_seed(0)
    loss = {"train_loss": 2.3456}

    def up(u: ClientUpdate, compact: bool) -> int:
        return wire.wire_bytes(wire.update_to_chunks(u, task, compact=compact))

    def down(ins: Instruction) -> int:
        return wire.wire_bytes(wire.instruction_to_chunks(ins, task))

    mods = sorted(f"model.layers.{i}.self_attn.{m}" for i in range(SMOLLM2_LAYERS) for m in SMOLLM2_QV)
    t = {f"{m}.A": torch.zeros(rank, SMOLLM2_QV[m.rsplit(".", 1)[1]][1]) for m in mods}
    t |= {f"{m}.B": torch.zeros(SMOLLM2_QV[m.rsplit(".", 1)[1]][0], rank) for m in mods}
    R = torch.randn(len(mods), rank, rank, generator=g)
    sb = get_algorithm("fedsb", FedSBConfig(rank=rank))
    state = GlobalState(1, t | {"R": R}, {})
    sync_after = sb.sync_payload(state, 0)  # the method's own payload and update layout
    spec = sb.expected_update(state, {})
    after_u = ClientUpdate("client-0", 50, {k: R.clone() for k in spec.tensors}, dict(loss))
    before_u = ClientUpdate("client-0", 50, {f"{m}.R": R[i].clone() for i, m in enumerate(mods)}, dict(loss))
    sync_before = type(sync_after)({f"{m}.R": R[i] for i, m in enumerate(mods)}, dict(sync_after.meta))
    train = {"steps": 4, "batch_size": 8, "lr": 1e-3, "seed": 123456789}
    rows = [{"figure": f"Fed-SB upload, SmolLM2 q,v r={rank}", "payload": payload_nbytes(after_u.tensors),
             "before": up(before_u, False), "after": up(after_u, True), "goal": 1.05},
            {"figure": f"Fed-SB round-2 download (sync R), r={rank}", "payload": payload_nbytes(sync_after.tensors),
             "before": down(Instruction(2, "client-0", 1, train, sync_before)),
             "after": down(Instruction(2, "client-0", 1, train, sync_after)), "goal": None}]
    ks = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=num_seeds))
    kstate = ks.initialize(torch.nn.Linear(2, 2), seed=0)
    kspec = ks.expected_update(kstate, {"steps": tau})
    pairs = {"seed_idx": torch.randint(0, num_seeds, (tau,), generator=g, dtype=torch.int32),
             "grad": torch.randn(tau, generator=g)}
    assert {k: (tuple(v.shape), v.dtype) for k, v in pairs.items()} == {
        k: (s.shape, s.dtype) for k, s in kspec.tensors.items()}
    old_metrics = dict(loss, zo_clipped_frac=0.0, zo_skipped_steps=0.0,
                       zo_grad_abs_mean=float(pairs["grad"].abs().mean()))
    rows.append({"figure": f"FedKSeed upload, τ = {tau}", "payload": payload_nbytes(pairs),
                 "before": up(ClientUpdate("client-0", 50, pairs, old_metrics), False),
                 "after": up(ClientUpdate("client-0", 50, pairs, dict(loss)), True), "goal": 1.1})
    for r in rows:
        r["ratio_before"], r["ratio_after"] = r["before"] / r["payload"], r["after"] / r["payload"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    add_workload_args(ap)
    ap.add_argument("--methods", nargs="+", default=["fedavg", "flora", "fedsb"])
    ap.add_argument("--fedsb-tuned-lr", type=float, default=0.0, help="also run Fed-SB with this lr (0 = skip)")
    ap.add_argument("--wire-only", action="store_true", help="only the serialized ÷ payload ratios, before/after")
    ap.add_argument("--tau", type=int, default=200, help="FedKSeed local steps for --wire-only")
    ap.add_argument("--out", default="simulations/bench/results/comm.json")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if a.wire_only:
        rows = wire_only(a.rank, a.tau)
        print(f"{'figure':>42} | {'payload B':>9} | {'before B':>8} | {'after B':>8} | {'ratio before':>12} | "
              f"{'ratio after':>11} | goal")
        for r in rows:
            goal = f"≤ {r['goal']}: {'met' if r['ratio_after'] <= r['goal'] else 'NOT met'}" if r["goal"] else ""
            print(f"{r['figure']:>42} | {r['payload']:>9,} | {r['before']:>8,} | {r['after']:>8,} | "
                  f"{r['ratio_before']:>12.4f} | {r['ratio_after']:>11.4f} | {goal}")
        out = Path(a.out).with_name(Path(a.out).stem + "_wire.json") if a.out.endswith("comm.json") else Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rank": a.rank, "tau": a.tau, "rows": rows}, indent=2))
        return
    ov = base_overrides(a)
    runs = [(m, m, ov) for m in a.methods]
    if a.fedsb_tuned_lr:
        runs.append(("fedsb", f"fedsb@lr={a.fedsb_tuned_lr:g}", dict(ov, **{"train.lr": a.fedsb_tuned_lr})))
    t0 = time.perf_counter()
    results = []
    for algo, tag, o in runs:
        results.append(run_method(algo, o, a.work, tag))
        print(f"done {tag}: {results[-1]['wall_s']:.1f} s, eval {results[-1]['summary']['eval_loss_final']:.4f}",
              flush=True)
    table = [comm_row(r) for r in results]
    print(f"\n{a.model}, {a.clients} clients × {a.rounds} rounds × {a.local_steps} steps, batch {a.batch}×{a.seq}, "
          f"r={a.rank}, q,v, lr {a.lr:g} (bytes per client-round)")
    print_table(table)
    sb = next((t for t in table if t["method"] == "fedsb"), None)
    if sb and sb["fedsb_vs_lora_upload_ratio"] is not None:
        print(f"Fed-SB reported fedsb_vs_lora_upload_ratio = {sb['fedsb_vs_lora_upload_ratio']:.4f}")
    res = {"workload": vars(a), "table": table, "runs": results, "total_wall_s": time.perf_counter() - t0}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
