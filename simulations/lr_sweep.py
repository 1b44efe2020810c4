"""Learning-rate sweep that chose each method's default `lr` (fedtune/algorithms/*/config.py).

Every value runs the same workload (simulations/report.toml: SmolLM2-135M-Instruct, chatterbot by category,
4 clients, the same rounds and local steps); the pick is the lowest final eval loss on the clients' held-out
slices (the validation split: the global test set that the report compares methods on is not used to choose).

    PYTHONPATH=. python simulations/lr_sweep.py                      # all methods, SmolLM2 (long)
    PYTHONPATH=. python simulations/lr_sweep.py --methods fedsb --rounds 3
    PYTHONPATH=. python simulations/lr_sweep.py --model tiny --quick  # seconds

Writes simulations/results/lr_sweep_<method>.json (one file per method, so methods can run in parallel).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GRID = {  # FedAvg/FLoRA/Fed-SB: AdamW lr; FedKSeed (trainable = "lora"): the ZO step size η
    "fedavg": [1e-3, 3e-3, 1e-2],
    "flora": [1e-3, 3e-3, 1e-2],
    "fedsb": [3e-3, 1e-2, 3e-2],
    "fedkseed": [1e-4, 1e-3, 1e-2],
}


def lr_override(method: str, lr: float) -> dict:
    return {f"{method}.lr": lr}


def run_one(base: Path, method: str, lr: float, out: Path, overrides: dict) -> dict:
    from fedtune import config
    from fedtune.simulation import simulate

    cfg = config.load(base, {"run.algorithm": method, "run.out": str(out), **lr_override(method, lr), **overrides})
    t0 = time.perf_counter()
    s = simulate(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"lr": lr, "eval_loss": [r.get("eval_loss") for r in rows], "eval_loss_final": s["eval_loss_final"],
            "test_loss_final": s.get("test_loss_final"), "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "report.toml"))
    p.add_argument("--methods", nargs="+", default=list(GRID), choices=list(GRID))
    p.add_argument("--model", help="override [model] name (tiny for a smoke run)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-steps", type=int)
    p.add_argument("--quick", action="store_true", help="2 rounds × 2 steps (with --model tiny: seconds)")
    p.add_argument("--out", default="runs/lr_sweep", help="run dirs go under here")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--no-test-split", action="store_true", help="data.test_fraction = 0 (as the sweep was run)")
    a = p.parse_args(argv)
    overrides = {"model.name": a.model, "run.rounds": 2 if a.quick else a.rounds,
                 "train.local_steps": 2 if a.quick else a.local_steps,
                 "data.test_fraction": 0.0 if a.no_test_split else None}
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    for method in a.methods:
        rows = []
        for lr in GRID[method]:
            out = Path(a.out) / f"{method}-lr{lr:g}-{int(time.time())}"
            rows.append(run_one(Path(a.config), method, lr, out, overrides))
            print(f"{method} lr={lr:g}: eval {rows[-1]['eval_loss']} ({rows[-1]['wall_s']} s)", flush=True)
        finite = [r for r in rows if r["eval_loss_final"] is not None and math.isfinite(r["eval_loss_final"])]
        best = min(finite, key=lambda r: r["eval_loss_final"])["lr"] if finite else None
        doc = {"method": method, "config": a.config, "overrides": {k: v for k, v in overrides.items() if v is not None},
               "grid": GRID[method], "runs": rows, "best_lr": best}
        (results / f"lr_sweep_{method}.json").write_text(json.dumps(doc, indent=1))
        print(f"{method}: best lr {best:g}" if best else f"{method}: no finite result", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
