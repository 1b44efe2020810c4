"""Sample-level DP: utility vs ε for Fed-SB, FedAvg-LoRA and FedKSeed (DP zeroth-order), and the cost of a DP
local step (first-order and zeroth-order).

(a) grid: eval loss after the same rounds at ε ∈ --eps (default 1 3 8 inf) for each method. Finite ε:
    [privacy] mode = "sample", target_epsilon = ε, δ default (min(1/N_k, 1e-5)), C = max_grad_norm = 1,
    RDP accountant; σ is calibrated per client over the planned rounds × local steps (printed). ε = inf is
    the non-private run (mode = "none", AdamW with the usual clipping of the batch gradient). Runs go one
    after another. The default workload is smaller than comm.py's (2 clients, 2 rounds, 3 local steps) so the
    8-run grid fits in minutes on 2 CPUs; every size is a flag. `--model tiny` is a quick smoke mode.
    Methods "fedkseed-lora" / "fedkseed-full" are FedKSeed (trainable = "lora" q,v r / "full") with DP
    zeroth-order: C = --zo-clip clips each example's projected-gradient scalar (on g's scale, not a gradient
    norm); ε = inf is plain FedKSeed. τ = --zo-steps ZO steps per round; 0 = calibrated to the first-order
    methods' training time per round (fedkseed.py's calibration: τ = local_steps · t_first_order / t_zo).
(b) step cost: seconds per local step, DP vs non-DP, on the SAME fixed batches (batch × seq), LoRA q,v r=8:
    - nondp: fedtune's `train_local` loop (AdamW, batch-gradient clipping)
    - dp: fedtune's `dp_training` (opacus GradSampleModule + DPOptimizer over AdamW, per-example clipping,
      noise σ = 1) with the same batches, sum of per-example losses backpropagated
    - dp_before (--step-before): dp with the per-example loss before issue 15 (cross-entropy over the strided
      (B, V, T−1) view of the logits), for a before/after ratio in the same run
    Runs alternate nondp/dp; median of --repeats; ratio dp / nondp (goal ≤ 1.08). Each timed block includes
    building the optimiser (and, for dp, attaching/detaching opacus), as one local round does.
(d) client-level grid (--client-grid): final eval loss of each --methods (Fed-SB, FedAvg-LoRA) at each finite ε under
    the three ways to protect a whole client, same clients (--clients, every client every round), rounds and seeds:
    "central" ([privacy] mode = "client": the coordinator clips and noises, it sees each update), "client+secagg"
    (the same noise, added by the coordinator to the securely summed clipped updates: it sees the exact sum) and
    "distributed" ([privacy] mode = "distributed" with a 32-bit ring: the clients add Skellam noise before masking;
    min_survivors = all clients, so no noise is planned for dropouts). C = --client-clip, δ default, σ calibrated
    to ε over the rounds. Ratio distributed / central per cell (goal ≤ 1.05).
(c) ZO step cost per --zo-modes (lora, full): one FedKSeed step (two perturbed forwards, the step's scalar,
    the update) on the same fixed batches: hf = the old step (HF batch-mean loss, 4 z regenerations), nondp =
    FedKSeedClient.step without DP (per-example losses, their mean), dp = the same with σ = 1, C = 1.
    Alternating, median of --repeats; ratios dp / nondp (goal ≤ 1.05) and dp / hf.

    python simulations/bench/privacy.py [--model smollm2|tiny] [--eps 1 3 8 inf] [--methods fedsb fedavg]
        [--clients 2] [--rounds 2] [--local-steps 3] [--fedsb-lr X] [--skip-grid] [--skip-step]
        [--step-steps 3] [--repeats 3] [--step-before] [--threads 0] [--zo-steps 0] [--zo-clip 1] [--zo-lr 0] [--zo-modes lora full] [--skip-zo-step]
        [--client-grid] [--client-clip 0.1] [--client-modes central client+secagg distributed]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comm import add_workload_args, base_overrides, run_method

from fedtune.algorithms.fedkseed import FedKSeedConfig
from fedtune.privacy.accounting import noise_for_target


def zo_steps(a: argparse.Namespace, mode: str) -> int:
    """τ for FedKSeed in `mode`: --zo-steps, or calibrated to the first-order step time (fedkseed.py)."""
    if a.zo_steps:
        return a.zo_steps
    if f"zo_{mode}" not in a.calib:
        from fedkseed import calibrate

        ns = argparse.Namespace(**vars(a), calib_steps=2, calib_repeats=1)
        a.calib.update(calibrate(ns, [mode]))
        print("calibration (s/step): " + ", ".join(f"{k} {v:.3f}" for k, v in a.calib.items()), flush=True)
    return max(1, round(a.local_steps * a.calib["first_order"] / a.calib[f"zo_{mode}"]))


def grid(a: argparse.Namespace) -> list[dict[str, Any]]:
    ov = base_overrides(a)
    out = []
    for method in a.methods:
        algorithm = method.split("-")[0]
        for eps in a.eps:
            o = dict(ov)
            if method == "fedsb" and a.fedsb_lr:
                o["train.lr"] = a.fedsb_lr
            if algorithm == "fedkseed":
                mode = method.split("-")[1]
                o.update({"fedkseed.trainable": mode, "fedkseed.rank": a.rank, "fedkseed.alpha": 2 * a.rank,
                          "train.local_steps": zo_steps(a, mode), "privacy.max_grad_norm": a.zo_clip})
                if a.zo_lr:
                    o["fedkseed.lr"] = a.zo_lr
            if math.isfinite(eps):
                o.update({"privacy.mode": "sample", "privacy.target_epsilon": eps, "privacy.noise_seed": a.seed})
            tag = f"{method}_eps{eps:g}"
            res = run_method(algorithm, o, a.work, tag)
            rows = res["rows"]
            row = {"method": method, "target_epsilon": eps, "lr": o["train.lr"], "local_steps": o["train.local_steps"],
                   "eval_loss": [r.get("eval_loss") for r in rows],
                   "eval_loss_final": res["summary"]["eval_loss_final"],
                   "epsilon_spent": res["summary"]["epsilon"], "delta": res["summary"]["delta"],
                   "rounds_completed": res["summary"]["rounds_completed"],
                   "stopped_early": res["summary"]["stopped_early"], "wall_s": res["wall_s"]}
            if algorithm == "fedkseed":
                row["lr"] = a.zo_lr or FedKSeedConfig(trainable=mode).lr  # FedKSeed's own η, not train.lr
                row["zo_grad_abs_mean"] = [r.get("fedkseed_grad_abs_mean") for r in rows[1:]]
            out.append(row)
            print(f"done {tag}: eval {row['eval_loss_final']:.4f}, ε spent {row['epsilon_spent']}, "
                  f"{res['wall_s']:.1f} s", flush=True)
    return out


def sigmas(a: argparse.Namespace) -> dict[str, Any]:
    """σ each client gets for each finite ε (same calibration as SampleLevelDP), from the clients' train sizes."""
    from fedtune import config
    from fedtune.data.prepare import prepare_data
    from fedtune.models import load_model

    cfg = config.load("simulations/demo.toml", base_overrides(a))
    _, tok = load_model(a.model)
    data, _ = prepare_data(cfg, tok)
    out = {}
    steps = {"first_order": a.local_steps}
    steps.update({m: zo_steps(a, m.split("-")[1]) for m in a.methods if m.startswith("fedkseed")})
    for name, st in steps.items():
        for eps in [e for e in a.eps if math.isfinite(e)]:
            per = {}
            for cid, d in data.items():
                n = len(d.train)
                q = min(a.batch, n) / n
                per[cid] = {"n": n, "q": q, "delta": min(1 / n, 1e-5), "steps": st * a.rounds,
                            "sigma": noise_for_target(eps, min(1 / n, 1e-5), q, st * a.rounds, "rdp")}
            out[f"{name} eps={eps:g}"] = per
    return out


CLIENT_MODES = {
    "central": {"privacy.mode": "client"},
    "client+secagg": {"privacy.mode": "client", "secagg.enabled": True},
    "distributed": {"privacy.mode": "distributed", "secagg.enabled": True, "secagg.bits": 32},
}


def client_grid(a: argparse.Namespace) -> list[dict[str, Any]]:
    """(d): final eval loss per method × finite ε × client-level mode."""
    if a.clients < 3:
        raise SystemExit("--client-grid needs --clients ≥ 3 (secure aggregation sums at least 3 clients)")
    ov = base_overrides(a)
    ov.update({"federation.fraction": 1.0, "secagg.min_survivors": a.clients, "privacy.clip_norm": a.client_clip})
    out = []
    for method in [m for m in a.methods if m in ("fedsb", "fedavg")]:
        for eps in [e for e in a.eps if math.isfinite(e)]:
            for mode, extra in ((m, CLIENT_MODES[m]) for m in a.client_modes):
                o = {**ov, **extra, "privacy.target_epsilon": eps}
                if mode != "distributed":
                    o["privacy.noise_seed"] = a.seed
                if method == "fedsb" and a.fedsb_lr:
                    o["train.lr"] = a.fedsb_lr
                tag = f"{method}_{mode.replace('+', '_')}_eps{eps:g}"
                res = run_method(method, o, a.work, tag)
                last = res["rows"][-1]
                out.append({"method": method, "mode": mode, "target_epsilon": eps,
                            "eval_loss_final": res["summary"]["eval_loss_final"],
                            "eval_loss_first": res["summary"]["eval_loss_first"],
                            "epsilon_spent": res["summary"]["epsilon"], "noise_multiplier": last.get("noise_multiplier"),
                            "ddp_bits": last.get("ddp_bits"), "bytes_up_total": res["summary"]["bytes_up_total"],
                            "rounds_completed": res["summary"]["rounds_completed"], "wall_s": res["wall_s"]})
                print(f"done {tag}: eval {out[-1]['eval_loss_final']:.4f}, ε spent {out[-1]['epsilon_spent']}, "
                      f"σ {out[-1]['noise_multiplier']}, {res['wall_s']:.1f} s", flush=True)
    return out


def step_cost(a: argparse.Namespace) -> dict[str, Any]:
    from fedtune.algorithms.common.lora import activate, attach_lora
    from fedtune.data import ChatFormatter, collate, load_chatterbot
    from fedtune.models import load_model
    from fedtune.privacy.sample import dp_training, per_example_loss
    from fedtune.training.loop import LocalTrainConfig, train_local

    torch.manual_seed(0)
    model, tok = load_model(a.model)
    model = attach_lora(model, adapter="default", rank=8, alpha=16, targets=["q_proj", "v_proj"])
    activate(model, "default")
    pad = tok.pad_token_id
    feats = [f for f in ChatFormatter(tok, a.seq).many(load_chatterbot()[:800]) if len(f["input_ids"]) >= a.seq]
    feats = (feats or ChatFormatter(tok, a.seq).many(load_chatterbot()[:64]))[: a.batch * a.step_steps]
    fixed = [collate(feats[i * a.batch:(i + 1) * a.batch], pad) for i in range(a.step_steps)]
    cfg = LocalTrainConfig(steps=a.step_steps, batch_size=a.batch, lr=1e-4)

    def nondp():
        # train_local over exactly these features in order: with batch_size = len/steps and a fixed seed the
        # shuffled stream covers each example once; the cost per step does not depend on which batch it is
        train_local(model, feats, cfg, pad_id=pad)

    def dp(loss_fn):
        def run():
            model.train()
            with dp_training(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=a.batch,
                             lr=cfg.lr) as (gsm, opt):
                for batch in fixed:
                    loss_fn(gsm, batch).sum().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            model.eval()
        return run

    fns = {"nondp": nondp, "dp": dp(per_example_loss)}
    if a.step_before:
        fns["dp_before"] = dp(strided_example_loss)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) / a.step_steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": a.model, "batch": [a.batch, int(fixed[0]["input_ids"].shape[1])], "steps": a.step_steps,
            "repeats": a.repeats, "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "s_per_step": med,
            "ratio_dp_over_nondp": med["dp"] / med["nondp"],
            **({"ratio_dp_before_over_nondp": med["dp_before"] / med["nondp"]} if a.step_before else {}),
            "samples": times}


def strided_example_loss(model, batch):
    """The DP per-example loss before issue 15: cross-entropy over the strided (B, V, T−1) view of the logits."""
    from fedtune.data.format import IGNORE

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lg, lb = logits[:, :-1].float(), batch["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(lg.transpose(1, 2), lb, ignore_index=IGNORE, reduction="none")
    return tok.sum(1) / (lb != IGNORE).sum(1).clamp(min=1)


def zo_step_cost(a: argparse.Namespace, mode: str) -> dict[str, Any]:
    """s/step of a FedKSeed step in `mode`: old HF-loss step vs per-example non-DP vs DP, same fixed batches."""
    from fedtune.algorithms import get_algorithm
    from fedtune.algorithms.fedkseed import FedKSeedConfig
    from fedtune.data import ChatFormatter, collate, load_chatterbot
    from fedtune.models import load_model
    from fedtune.privacy.sample import DPRound
    from fedtune.training import zo

    model, tok = load_model(a.model, seed=a.seed)
    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=64, trainable=mode, rank=8, alpha=16))
    state = algo.initialize(model, seed=a.seed)
    client = algo.make_client()
    model = client.setup(model, algo.setup_payload(state))
    model.eval()
    params = zo.zo_parameters(model)
    eps, lr = 5e-4, float(algo.config.lr)
    pad = tok.pad_token_id
    feats = [f for f in ChatFormatter(tok, a.seq).many(load_chatterbot()[:800]) if len(f["input_ids"]) >= a.seq]
    feats = (feats or ChatFormatter(tok, a.seq).many(load_chatterbot()[:64]))[: a.batch * a.step_steps]
    fixed = [collate(feats[i * a.batch:(i + 1) * a.batch], pad) for i in range(a.step_steps)]
    seeds = client.seeds[: a.step_steps]
    dp = DPRound(noise_multiplier=1.0, clip=1.0, sample_rate=0.01, expected_batch=a.batch,
                 generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def hf():  # the step before per-example losses: g from HF's batch-mean token loss
        for s, b in zip(seeds, fixed):
            zo.perturb(params, s, eps)
            lp = float(model(**b).loss)
            zo.perturb(params, s, -2 * eps)
            lm = float(model(**b).loss)
            zo.perturb(params, s, eps)
            zo.apply_update(params, s, lr * (lp - lm) / (2 * eps))

    def step(private):
        def run():
            for s, b in zip(seeds, fixed):
                client.step(model, params, [b], s, eps=eps, lr=lr, grad_clip=100.0, dp=private)
        return run

    fns = {"hf": hf, "nondp": step(None), "dp": step(dp)}
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) / a.step_steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    # the only work DP adds to a step, timed alone: clip + sum + one normal draw vs the plain mean of the g_i
    from timeit import timeit

    from fedtune.privacy.sample import private_scalar_mean

    g_i = torch.randn(a.batch, dtype=torch.float64)
    reps = 20000
    extra = (timeit(lambda: private_scalar_mean(g_i, clip=1.0, noise_multiplier=1.0, expected_batch=a.batch,
                                                generator=dp.generator), number=reps)
             - timeit(lambda: zo.mean_grad(g_i), number=reps)) / reps
    return {"dp_extra_s": extra, "dp_extra_ratio_bound": 1 + extra / med["nondp"], "mode": mode, "model": a.model, "batch": [a.batch, int(fixed[0]["input_ids"].shape[1])],
            "trainable": sum(p.numel() for _, p in params), "steps": a.step_steps, "repeats": a.repeats,
            "threads": torch.get_num_threads(), "s_per_step": med, "ratio_dp_over_nondp": med["dp"] / med["nondp"],
            "ratio_dp_over_hf": med["dp"] / med["hf"], "samples": times}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_workload_args(ap, clients=2, rounds=2, local_steps=3)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    ap.add_argument("--methods", nargs="+", default=["fedsb", "fedavg"])
    ap.add_argument("--fedsb-lr", type=float, default=0.0, help="Fed-SB lr (0 = the shared --lr)")
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--step-steps", type=int, default=3)
    ap.add_argument("--step-before", action="store_true",
                    help="(b) also time the DP step with the old strided per-example loss (before issue 15)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--zo-steps", type=int, default=0, help="FedKSeed τ per round (0 = calibrated to equal time)")
    ap.add_argument("--zo-clip", type=float, default=1.0, help="FedKSeed DP: clip C of each example's scalar g_i")
    ap.add_argument("--zo-lr", type=float, default=0.0, help="FedKSeed η (0 = its default per mode)")
    ap.add_argument("--zo-modes", nargs="+", default=["lora", "full"], help="modes for the ZO step cost")
    ap.add_argument("--skip-zo-step", action="store_true")
    ap.add_argument("--client-grid", action="store_true", help="(d) central vs secagg vs distributed client-level DP")
    ap.add_argument("--client-clip", type=float, default=0.1, help="(d) client-level DP: L2 clip C of an update")
    ap.add_argument("--client-modes", nargs="+", default=list(CLIENT_MODES), choices=list(CLIENT_MODES),
                    help="(d) which modes (central and distributed are needed for the ratio)")
    ap.add_argument("--out", default="simulations/bench/results/privacy.json")
    a = ap.parse_args()
    bad = [m for m in a.methods if m not in ("fedsb", "fedavg", "flora", "fedkseed-lora", "fedkseed-full")]
    if bad:
        ap.error(f"unknown --methods {bad}: fedsb, fedavg, flora, fedkseed-lora, fedkseed-full")
    a.calib = {}
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    t0 = time.perf_counter()
    res: dict[str, Any] = {"workload": {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf")
                                        for k, v in vars(a).items() if k not in ("eps", "calib")},
                           "eps": [e if math.isfinite(e) else "inf" for e in a.eps]}
    if not a.skip_grid:
        res["sigma"] = sigmas(a)
        res["grid"] = g = grid(a)
        print(f"\n{a.model}, {a.clients} clients × {a.rounds} rounds × {a.local_steps} steps, batch {a.batch}×{a.seq}, "
              f"r={a.rank}, q,v; sample-level DP, C=1, δ=min(1/N_k,1e-5), RDP")
        for eps, per in res["sigma"].items():
            print(f"  {eps}: σ per client " + ", ".join(f"{c}:{v['sigma']:.3f} (q={v['q']:.4f})" for c, v in per.items()))
        print(f"{'method':>8} | {'lr':>7} | " + " | ".join(f"{'ε=' + format(e, 'g'):>8}" for e in a.eps)
              + " | (final eval loss; base = round 0)")
        for m in a.methods:
            cells = [r for r in g if r["method"] == m]
            print(f"{m:>8} | {cells[0]['lr']:>7g} | " + " | ".join(f"{r['eval_loss_final']:>8.4f}" for r in cells)
                  + f" | base {cells[0]['eval_loss'][0]:.4f}")
        bad = [r for r in g if r["stopped_early"] or r["rounds_completed"] != a.rounds]
        zo = [r for r in g if r["method"].startswith("fedkseed")]
        if zo:
            print("FedKSeed τ per round: " + ", ".join(sorted({f"{r['method']} {r['local_steps']}" for r in zo}))
                  + f"; C = {a.zo_clip} on each example's projected gradient")
        for r in bad:
            print(f"WARNING {r['method']} ε={r['target_epsilon']}: {r['rounds_completed']} rounds, {r['stopped_early']}")
    if not a.skip_step:
        res["step"] = s = step_cost(a)
        print(f"\nDP step cost ({a.model}, LoRA q,v r=8, batch {s['batch'][0]}×{s['batch'][1]}): "
              f"non-DP {s['s_per_step']['nondp']:.3f} s/step | DP {s['s_per_step']['dp']:.3f} s/step | "
              f"ratio {s['ratio_dp_over_nondp']:.3f} (goal ≤ 1.08)"
              + (f" | DP before (strided loss) {s['s_per_step']['dp_before']:.3f} s/step, ratio "
                 f"{s['ratio_dp_before_over_nondp']:.3f}" if a.step_before else "")
              + f" | {s['threads']} threads, load {s['loadavg'][0]:.2f}")
    if not a.skip_zo_step:
        res["zo_step"] = zs = [zo_step_cost(a, m) for m in a.zo_modes]
        for s in zs:
            t = s["s_per_step"]
            print(f"ZO step cost ({a.model}, {s['mode']}, {s['trainable']:,} trainable, batch {s['batch'][0]}×"
                  f"{s['batch'][1]}): old HF-loss {t['hf']:.3f} | non-DP {t['nondp']:.3f} | DP {t['dp']:.3f} s/step | "
                  f"DP ÷ non-DP {s['ratio_dp_over_nondp']:.3f} (goal ≤ 1.05) | DP ÷ old {s['ratio_dp_over_hf']:.3f} | "
                  f"DP-only work {s['dp_extra_s'] * 1e6:.1f} µs/step → ratio bound {s['dp_extra_ratio_bound']:.5f}")
    if a.client_grid:
        res["client_grid"] = cg = client_grid(a)
        print(f"\nclient-level DP ({a.model}, {a.clients} clients × {a.rounds} rounds, every client every round, "
              f"C = {a.client_clip}): final eval loss")
        print(f"{'method':>7} | {'ε':>4} | " + " | ".join(f"{m:>13}" for m in a.client_modes) + " | distributed ÷ central")
        for method in dict.fromkeys(r["method"] for r in cg):
            for eps in dict.fromkeys(r["target_epsilon"] for r in cg):
                cell = {r["mode"]: r for r in cg if r["method"] == method and r["target_epsilon"] == eps}
                ratio = (cell["distributed"]["eval_loss_final"] / cell["central"]["eval_loss_final"]
                         if {"distributed", "central"} <= set(cell) else float("nan"))
                for r in cell.values():
                    r["ratio_distributed_over_central"] = ratio
                print(f"{method:>7} | {eps:>4g} | " + " | ".join(f"{cell[m]['eval_loss_final']:>13.4f}"
                                                                for m in a.client_modes)
                      + f" | {ratio:.4f} (goal ≤ 1.05)")
    res["calibration_s_per_step"] = a.calib
    res["total_wall_s"] = time.perf_counter() - t0
    for r in res.get("grid", []):
        if not math.isfinite(r["target_epsilon"]):
            r["target_epsilon"] = "inf"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
