"""FLoRA state over many rounds: checkpoint bytes, the catch-up download of a client absent since round 0,
and the exported adapter rank, at chosen rounds. Synthetic client factors (no training), tiny model.
Run it against any fedtune checkout (PYTHONPATH) to compare versions; writes JSON.

    python simulations/bench/flora_state.py [--clients 200] [--per-round 10] [--rank 16] [--rounds 50]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from fedtune.algorithms import ClientUpdate, get_algorithm
from fedtune.algorithms.api import payload_nbytes
from fedtune.algorithms.common.lora import lora_shapes
from fedtune.algorithms.flora import FLoRAConfig
from fedtune.models import tiny_llama, tiny_tokenizer
from fedtune.run import checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--report", type=int, nargs="+", default=[2, 10, 50])
    ap.add_argument("--out", default="simulations/bench/results/flora_state.json")
    args = ap.parse_args()
    tok = tiny_tokenizer()
    algo = get_algorithm("flora", FLoRAConfig(rank=args.rank, alpha=2 * args.rank))
    base = tiny_llama(len(tok), seed=0)
    shapes = lora_shapes(base, algo.config.target_modules)
    state = algo.initialize(base, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, args.rounds + 1):
            g = torch.Generator().manual_seed(rnd)
            picked = sorted(np.random.default_rng(rnd).choice(args.clients, args.per_round, replace=False))
            ups = [ClientUpdate(f"c{i}", 10, {
                **{f"{m}.A": torch.randn(args.rank, i_, generator=g) * 0.1 for m, (_, i_) in shapes.items()},
                **{f"{m}.B": torch.randn(o, args.rank, generator=g) * 0.01 for m, (o, _) in shapes.items()}})
                for i in picked]
            state, _ = algo.aggregate(rnd, state, ups)
            if rnd in args.report:
                ck = checkpoint.save(Path(tmp), checkpoint.Checkpoint(rnd, state, {}))
                client = algo.make_client()
                model = client.setup(tiny_llama(len(tok), seed=0), algo.setup_payload(state))
                catch_up = algo.sync_payload(state, 0)
                client.sync(model, catch_up)
                factors = client.export_factors(model)
                rows.append({"round": rnd, "checkpoint_bytes": (ck / "global.safetensors").stat().st_size,
                             "catch_up_bytes": payload_nbytes(catch_up.tensors),
                             "export_rank": max(a.shape[0] for a, _ in factors.values()),
                             "export_bytes": sum(payload_nbytes({"a": a, "b": b}) for a, b in factors.values())})
                print(json.dumps(rows[-1]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
