"""Flower deployment runtime (flwr 1.41: real flower-superlink + flower-supernode processes on localhost):
round wall time and bytes down per round with node-local state (state-dir) vs without.

flwr 1.41 starts a fresh ClientApp process for every message, so a node keeps nothing in memory between
rounds. Without state-dir every node answers "stale" from round 2 on and is resent setup + the whole
history (two messages); with state-dir it rebuilds its model from its own disk and gets the delta only.

Workload: tiny random Llama, FLoRA (ranks 8/4/4 on q,v), 3 SuperNodes on demo partitions (partition-id,
chatterbot by category, 48 train examples each), 3 local steps, 3 rounds, [run] threads = 1.

    python simulations/bench/flower_deploy.py [--rounds 3] [--modes state-dir none]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fedtune.transports.flower.localdeploy import LocalFederation


def run_mode(mode: str, rounds: int, work: Path) -> dict:
    nodes = [{"partition-id": k, "num-partitions": 3} | ({"state-dir": str(work / "state")} if mode == "state-dir"
                                                          else {}) for k in range(3)]
    out = work / "out"
    cfg = {"fedtune.run.rounds": rounds, "fedtune.run.out": str(out), "fedtune.run.threads": 1,
           "fedtune.federation.round_timeout_s": 900.0}
    t0 = time.perf_counter()
    with LocalFederation(work, nodes) as fed:
        proc = fed.flwr_run(ROOT / "simulations/flower_app", cfg)
        proc.wait(timeout=3600)
    total = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"mode": mode, "status": summary.get("status"), "total_s": round(total, 1),
            "wall_s": [r["wall_s"] for r in rows], "bytes_down": [r["bytes_down"] for r in rows],
            "flower_message_bytes_down": [r["down"] for r in summary["flower"]["rounds"]],
            "resyncs": summary["flower"]["resyncs"], "eval_loss_final": summary.get("eval_loss_final")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["state-dir", "none"], choices=["state-dir", "none"])
    args = ap.parse_args()
    results = []
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix=f"fedtune-flower-{mode}-") as tmp:
            r = run_mode(mode, args.rounds, Path(tmp))
        results.append(r)
        print(f"{mode:>10} | {r['status']} | wall/round {r['wall_s']} s | bytes down/round {r['bytes_down']} | "
              f"resyncs {r['resyncs']} | total {r['total_s']} s", flush=True)
    out = ROOT / "simulations/bench/results/flower_deploy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
