"""FedKSeed vs Fed-SB vs FLoRA at equal wall time per round, and the ZO step's peak memory.

(1) Equal wall time. Zeroth-order steps are cheaper than first-order ones (two no-grad forwards + seeded
    perturbations vs forward + backward + AdamW), so equal *steps* would favour the first-order methods and
    equal *budget* is the fair comparison. Approach (feasible on 2 CPUs): a calibration measures, side by
    side on the same batches (alternating, median of --calib-repeats), the seconds per local step of
    - a first-order LoRA q,v r step (what FLoRA's and Fed-SB's clients run; Fed-SB's r×r core adds ~nothing),
    - a FedKSeed ZO step in "lora" mode (ZO over LoRA A/B q,v r) and, if --full, in "full" mode (all
      134.5M weights: every step regenerates z three times); with --calib-before also full mode with the
      z generation before issue 15 (one mt19937 stream, one core) for a before/after ratio in one run;
      --calib-only stops after the calibration; --threads sets torch's threads;
    then FLoRA and Fed-SB get --local-steps L and FedKSeed gets τ = round(L · t_fo / t_zo) steps, so every
    client spends about the same training time per round. Reported per round: bytes up/down per client
    (serialized), eval loss, and cumulative wall time (round wall_s includes sync, aggregation and eval),
    so loss vs cumulative wall time can be read directly. FedKSeed runs in "lora" mode by default (full-
    parameter ZO is 3 z-regenerations of 135M numbers per step on CPU, plus a replay per (round, seed) on
    sync); `--full` also runs full mode on its own (calibrated, usually tiny) τ.
(2) Memory: peak RSS of one ZO step ÷ peak RSS of inference on SmolLM2 (goal ≤ 1.15), each measured in a
    fresh subprocess: VmHWM is reset to the current RSS by writing "5" to /proc/self/clear_refs, the
    operation runs, extra = VmHWM − VmRSS before; min of 3 (noise only adds); ratio = (weights + extra_op) ÷
    (weights + extra_forward), as tests/test_fedkseed.py does on a tiny model. Probes: forward (no_grad
    inference), zo_step (zo.spsa_step + zo.apply_update over all weights), fedkseed_round (FedKSeedClient.train,
    full mode, 1 step, with the exact restore: zo.ParamBackup spills θ to a temp file), first_order (forward + backward, all weights
    trainable, for scale).

(3) Wire and z (model-independent, tiny model, seconds): serialized bytes of the round-1 instruction (setup +
    sync + config) at K = 4096 seeds (goal ≤ 18 KB), serialized ÷ payload bytes of a real τ = 200 client update
    (goal ≤ 1.1), and z regenerations per ZO step counted over a client round (goal ≤ 3).

    python simulations/bench/fedkseed.py [--model smollm2|tiny] [--local-steps 4] [--rounds 2] [--clients 4]
        [--full] [--skip-sim] [--skip-memory] [--skip-wire] [--mem-batch 8] [--mem-seq 64] [--calib-only]
        [--calib-before] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comm import add_workload_args, base_overrides, run_method

ROOT = Path(__file__).resolve().parents[2]


# --- calibration -----------------------------------------------------------------------------------------

def calibrate(a: argparse.Namespace, modes: list[str]) -> dict[str, float]:
    """Median seconds per local step: first-order LoRA and FedKSeed ZO per mode, same batches, alternating."""
    import copy

    from fedtune.algorithms import get_algorithm
    from fedtune.algorithms.api import TrainContext
    from fedtune.algorithms.common.lora import activate, attach_lora
    from fedtune.algorithms.fedkseed import FedKSeedConfig
    from fedtune.data import ChatFormatter, load_chatterbot
    from fedtune.models import load_model
    from fedtune.training.loop import LocalTrainConfig, train_local

    base, tok = load_model(a.model, seed=a.seed)
    pad = tok.pad_token_id
    feats = [f for f in ChatFormatter(tok, a.seq).many(load_chatterbot()[:800]) if len(f["input_ids"]) >= a.seq]
    feats = (feats or ChatFormatter(tok, a.seq).many(load_chatterbot()[:64]))[: a.batch * a.calib_steps]
    n = a.calib_steps
    fns = {}
    fo_model = attach_lora(copy.deepcopy(base), adapter="default", rank=a.rank, alpha=2 * a.rank,
                           targets=["q_proj", "v_proj"])
    activate(fo_model, "default")
    fns["first_order"] = lambda: train_local(fo_model, feats, LocalTrainConfig(steps=n, batch_size=a.batch, lr=a.lr),
                                             pad_id=pad)
    for mode in modes:
        algo = get_algorithm("fedkseed", FedKSeedConfig(trainable=mode, rank=a.rank, alpha=2 * a.rank))
        m = base if mode == "full" else copy.deepcopy(base)
        state = algo.initialize(m, seed=a.seed)
        client = algo.make_client()
        m = client.setup(m, algo.setup_payload(state))
        cfg = algo.configure_round(1, state, ["c"], {"steps": n, "batch_size": a.batch}, ["c"])["c"]
        ctx = TrainContext("c", feats, pad)
        fns[f"zo_{mode}"] = (lambda client=client, m=m, cfg=cfg, ctx=ctx: client.train(m, ctx, dict(cfg, seed=0)))
        if mode == "full" and getattr(a, "calib_before", False):
            fns["zo_full_before"] = (lambda client=client, m=m, cfg=cfg, ctx=ctx:
                                     with_perturb(single_stream_perturb, client.train, m, ctx, dict(cfg, seed=0)))
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.calib_repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) / n)
    return {k: statistics.median(v) for k, v in times.items()}


def single_stream_perturb(params, seed: int, scale: float) -> None:
    """z generation before issue 15: one mt19937 stream over the tensors (randn per ≤ CHUNK piece), one core."""
    from fedtune.training import zo

    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _, p in params:
            flat = p.view(-1)
            for start in range(0, flat.numel(), zo.CHUNK):
                part = flat[start : start + zo.CHUNK]
                part.add_(torch.randn(part.numel(), generator=gen).to(p.device, p.dtype), alpha=scale)


def with_perturb(perturb, fn, *args):
    """Run fn with zo.perturb (every z regeneration of a step and of a replay) replaced by `perturb`."""
    from fedtune.training import zo

    orig, zo.perturb = zo.perturb, perturb
    try:
        return fn(*args)
    finally:
        zo.perturb = orig


def cumulative(rows: list[dict[str, Any]]) -> list[float]:
    out, t = [], 0.0
    for r in rows:
        if r["round"] > 0:
            t += r.get("wall_s") or 0.0
            out.append(round(t, 2))
    return out


def simulations(a: argparse.Namespace, calib: dict[str, float]) -> list[dict[str, Any]]:
    ov = base_overrides(a)
    runs: list[tuple[str, str, dict[str, Any]]] = [("flora", "flora", ov), ("fedsb", "fedsb", ov)]
    if a.fedsb_lr:
        runs.append(("fedsb", f"fedsb@lr={a.fedsb_lr:g}", dict(ov, **{"train.lr": a.fedsb_lr})))
    for mode in ["lora", *(["full"] if a.full else [])]:
        tau = max(1, round(a.local_steps * calib["first_order"] / calib[f"zo_{mode}"]))
        o = dict(ov, **{"train.local_steps": tau, "fedkseed.trainable": mode, "fedkseed.rank": a.rank,
                        "fedkseed.alpha": 2 * a.rank})
        if mode == "full" and a.full_rounds:
            o["run.rounds"] = a.full_rounds
        runs.append(("fedkseed", f"fedkseed-{mode} τ={tau}", o))
    out = []
    for algo, tag, o in runs:
        res = run_method(algo, o, a.work, tag.replace(" ", "_").replace("τ=", "tau"))
        rows = res["rows"]
        tr = [r for r in rows if r["round"] > 0]
        row = {"method": tag, "local_steps": o["train.local_steps"],
               "bytes_up_per_client": [r["bytes_up"] / r["clients_completed"] for r in tr],
               "payload_up_per_client": [r["payload_bytes_up"] / r["clients_completed"] for r in tr],
               "bytes_down_per_client": [r["bytes_down"] / r["clients_completed"] for r in tr],
               "eval_loss": [r.get("eval_loss") for r in rows], "train_loss": [r.get("train_loss") for r in tr],
               "round_wall_s": [r.get("wall_s") for r in tr], "cumulative_wall_s": cumulative(rows),
               "wall_s": res["wall_s"],
               "method_metrics": [{k: v for k, v in r.items() if k.startswith(("fedkseed_", "fedsb_", "flora_"))}
                                  for r in tr]}
        out.append(row)
        print(f"done {tag}: eval {row['eval_loss'][-1]:.4f}, {res['wall_s']:.1f} s", flush=True)
    return out


# --- memory ----------------------------------------------------------------------------------------------

PROBE = r"""
import json, sys, torch
from fedtune.models import load_model
from fedtune.training import zo
what, model_name, B, T = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from fedtune.models.memory import extra_peak, status

model, tok = load_model(model_name)
model.eval()
V = model.config.vocab_size
ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

if what == "forward":
    def fn():
        with torch.no_grad():
            model(**batch).loss.item()
elif what == "zo_step":
    model.requires_grad_(True)
    params = zo.zo_parameters(model)
    def fn():
        g, _, _ = zo.spsa_step(model, params, batch, 5, 5e-4)
        zo.apply_update(params, 5, 1e-6 * g)
elif what == "fedkseed_round":
    from fedtune.algorithms import get_algorithm
    from fedtune.algorithms.api import TrainContext
    from fedtune.algorithms.fedkseed import FedKSeedConfig
    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=64, trainable="full"))
    state = algo.initialize(model, seed=0)
    client = algo.make_client()
    model = client.setup(model, algo.setup_payload(state))
    feats = [{"input_ids": r, "labels": r} for r in ids.tolist()]
    cfg = dict(algo.configure_round(1, state, ["c"], {"steps": 1, "batch_size": B}, ["c"])["c"], seed=0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    def fn():
        client.train(model, TrainContext("c", feats, pad), cfg)
elif what == "first_order":
    model.requires_grad_(True)
    def fn():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
else:
    raise SystemExit(f"unknown probe {what}")

fn()  # warm-up: lazy init, allocator pools
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"weights": weights, "extra": extra_peak(fn), "rss_after": status("VmRSS")}))
"""


def memory(a: argparse.Namespace) -> dict[str, Any]:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        return {"skipped": "needs Linux /proc/self/clear_refs"}
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(a.mem_threads))
    out: dict[str, Any] = {"batch": [a.mem_batch, a.mem_seq], "threads": a.mem_threads}
    for what in a.mem_probes:
        p = subprocess.run([sys.executable, "-c", PROBE, what, a.model, str(a.mem_batch), str(a.mem_seq)],
                           env=env, capture_output=True, text=True, timeout=1200, check=False)
        if p.returncode != 0:
            out[what] = {"error": p.stderr[-1500:]}
            print(f"memory probe {what} failed:\n{p.stderr[-1500:]}")
            continue
        out[what] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"probe {what}: extra peak {out[what]['extra'] / 2**20:.1f} MiB", flush=True)
    if "extra" in out.get("forward", {}):
        inf = out["forward"]["weights"] + out["forward"]["extra"]
        out["inference_bytes"] = inf
        out["ratios"] = {w: (out[w]["weights"] + out[w]["extra"]) / inf
                         for w in ("zo_step", "fedkseed_round", "first_order") if "extra" in out.get(w, {})}
    return out


def wire_and_z(tau: int = 200, num_seeds: int = 4096) -> dict[str, Any]:
    """Round-1 download and τ-step upload sizes (serialized vs payload), z regenerations per ZO step."""

    from fedtune.algorithms import get_algorithm
    from fedtune.algorithms.api import Instruction, TrainContext, payload_nbytes
    from fedtune.algorithms.fedkseed import FedKSeedConfig
    from fedtune.data import ChatFormatter, load_chatterbot
    from fedtune.models import tiny_llama, tiny_tokenizer
    from fedtune.training import zo
    from fedtune.transports.wire import sizes

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=num_seeds, lr=1e-3))
    state = algo.initialize(tiny_llama(len(tok)), seed=0)
    base = {"steps": tau, "batch_size": 1, "grad_accum": 1, "lr": 1e-3, "weight_decay": 0.0, "max_grad_norm": 1.0}
    cfg = dict(algo.configure_round(1, state, ["client-0"], base, ["client-0"])["client-0"], seed=123456789)
    ins = Instruction(1, "client-0", 0, cfg, sync=algo.sync_payload(state, -1), setup=algo.setup_payload(state))
    client = algo.make_client()
    model = client.setup(tiny_llama(len(tok)), ins.setup)
    client.sync(model, ins.sync)
    calls = [0]
    orig = zo.block_generator
    nblocks = len(zo.layout(zo.zo_parameters(model))[1])

    def counting(seed, block):  # every generated z block; a regeneration = nblocks of them
        calls[0] += 1
        return orig(seed, block)

    zo.block_generator = counting
    try:
        feats = ChatFormatter(tok, 32).many(load_chatterbot()[:50])
        upd = client.train(model, TrainContext("client-0", feats, tok.pad_token_id), cfg)
    finally:
        zo.block_generator = orig
    payload = payload_nbytes(upd.tensors)
    return {"num_seeds": num_seeds, "tau": tau,
            "round1_download_bytes": sizes.instruction_bytes(ins),
            "round1_download_payload_bytes": payload_nbytes(ins.sync.tensors) + payload_nbytes(ins.setup.tensors),
            "upload_bytes": sizes.update_bytes(upd), "upload_payload_bytes": payload,
            "upload_ratio": sizes.update_bytes(upd) / payload, "z_regenerations_per_step": calls[0] / nblocks / tau}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_workload_args(ap)
    ap.add_argument("--full", action="store_true", help='also run FedKSeed trainable = "full"')
    ap.add_argument("--full-rounds", type=int, default=0, help="rounds for the full-mode run (0 = --rounds)")
    ap.add_argument("--fedsb-lr", type=float, default=0.0, help="also run Fed-SB with this lr (0 = skip)")
    ap.add_argument("--calib-steps", type=int, default=2)
    ap.add_argument("--calib-repeats", type=int, default=2)
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--calib-only", action="store_true", help="the step calibration only (no simulations)")
    ap.add_argument("--calib-before", action="store_true",
                    help="with --full: also time the full-mode step with the old single-stream z (before issue 15)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-wire", action="store_true")
    ap.add_argument("--mem-batch", type=int, default=8)
    ap.add_argument("--mem-seq", type=int, default=64)
    ap.add_argument("--mem-threads", type=int, default=1)
    ap.add_argument("--mem-probes", nargs="+", default=["forward", "zo_step", "fedkseed_round", "first_order"])
    ap.add_argument("--out", default="simulations/bench/results/fedkseed.json")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    res: dict[str, Any] = {"workload": vars(a), "threads": torch.get_num_threads(), "loadavg": os.getloadavg()}
    if not a.skip_sim or a.calib_only:
        res["calibration_s_per_step"] = calib = calibrate(a, ["lora", *(["full"] if a.full else [])])
        print(f"calibration (s/step, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}): "
              + ", ".join(f"{k} {v:.3f}" for k, v in calib.items())
              + "".join(f" | {k} ÷ first_order {calib[k] / calib['first_order']:.3f}"
                        for k in ("zo_full", "zo_full_before") if k in calib), flush=True)
    if not a.skip_sim and not a.calib_only:
        res["table"] = table = simulations(a, calib)
        print(f"\n{a.model}, {a.clients} clients × {a.rounds} rounds, FO local steps {a.local_steps}, batch "
              f"{a.batch}×{a.seq}, r={a.rank}, q,v; bytes per client per round (serialized)")
        print(f"{'method':>20} | {'steps':>5} | {'up B / round':>14} | {'down B / round':>22} | "
              f"{'eval loss per round (0 = base)':<30} | {'final − base':>12} | {'cum. wall s':<16}")
        for t in table:
            up = "/".join(f"{v:,.0f}" for v in sorted(set(t["bytes_up_per_client"])))
            down = "/".join(f"{v:,.0f}" for v in t["bytes_down_per_client"])
            ev = " ".join(f"{v:.4f}" for v in t["eval_loss"])
            cw = " ".join(f"{v:.0f}" for v in t["cumulative_wall_s"])
            delta = t["eval_loss"][-1] - t["eval_loss"][0]
            print(f"{t['method']:>20} | {t['local_steps']:>5} | {up:>14} | {down:>22} | {ev:<30} | {delta:>12.2e} | "
                  f"{cw:<16}")
    if not a.skip_memory:
        res["memory"] = mem = memory(a)
        if "ratios" in mem:
            r = mem["ratios"]
            print(f"\nmemory ({a.model}, batch {a.mem_batch}×{a.mem_seq}, weights "
                  f"{mem['forward']['weights'] / 2**20:.0f} MiB): inference {mem['inference_bytes'] / 2**20:.0f} MiB; "
                  + " | ".join(f"{k} ÷ inference {v:.3f}" for k, v in r.items())
                  + f"  (goal zo_step ≤ 1.15: {'met' if r.get('zo_step', 9) <= 1.15 else 'NOT met'})")
    if not a.skip_wire:
        res["wire"] = w = wire_and_z()
        print(f"\nwire (K = {w['num_seeds']}, τ = {w['tau']}): round-1 download {w['round1_download_bytes']:,} B "
              f"(goal ≤ 18 KB) | upload {w['upload_bytes']:,} B serialized ÷ {w['upload_payload_bytes']:,} B payload "
              f"= {w['upload_ratio']:.3f} (goal ≤ 1.1) | z regenerations per ZO step {w['z_regenerations_per_step']:g} "
              f"(goal ≤ 3)")
    res["total_wall_s"] = time.perf_counter() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
