"""FLoRA's state size for a large model, from the shapes alone (no weights, no GPU): what a checkpoint holds, what
a client downloads to catch up, and what the global ΔW costs in GPU memory beside a 4-bit base.

The rule is fedtune's (fedtune/algorithms/flora/shared.py `add_to_cumulative`): per target module the
cumulative ΔW = Σ_rounds B_stack·A_stack is kept as stacked float32 factors (A R×d_in, B d_out×R) while its rank
R = Σ r (every client of every round) stays below min(d_in, d_out), then as a dense float64 d_out×d_in matrix.
The server also keeps the stacks of the last `keep_rounds` rounds (only as many as together are no more bytes
than the cumulative). A client ≤ keep_rounds behind downloads the stacks it missed, any other (a new one) the
cumulative; a client holds ΔW on its GPU in float32 (factors or dense) beside the base.

Default: Mistral-7B (v0.3 shapes) with FlowerTune's LLM-leaderboard recipe: LoRA r = 32, 2 clients per round,
200 rounds, targets q_proj,v_proj (peft's default for Mistral), q,k,v,o (simulations/flowertune-7b.toml) and
every linear (q,k,v,o,gate,up,down).

    python simulations/bench/flora_size.py [--rounds 200] [--rank 32] [--clients 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MISTRAL_7B = {"layers": 32, "hidden": 4096, "intermediate": 14336, "kv": 1024, "vocab": 32768}


def shapes(m: dict, targets: list[str]) -> dict[str, tuple[int, int]]:
    """{target: (d_out, d_in)} of one decoder layer."""
    h, i, kv = m["hidden"], m["intermediate"], m["kv"]
    every = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
             "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    return {t: every[t] for t in targets}


def cumulative_bytes(d_out: int, d_in: int, rank: int, *, gpu: bool = False) -> int:
    """Bytes of one module's cumulative ΔW of rank `rank` (stored: float32 factors / float64 dense; gpu: float32)."""
    if rank == 0:
        return 0
    if rank < min(d_in, d_out):
        return 4 * rank * (d_in + d_out)
    return (4 if gpu else 8) * d_out * d_in


def sizes(m: dict, targets: list[str], rank: int, clients: int, rounds: int, keep_rounds: int = 4) -> dict:
    per_layer = shapes(m, targets)
    r_round = rank * clients
    stack = sum(4 * r_round * (o + i) for o, i in per_layer.values()) * m["layers"]  # one round's stacks
    cum = sum(cumulative_bytes(o, i, r_round * rounds) for o, i in per_layer.values()) * m["layers"]
    gpu = sum(cumulative_bytes(o, i, r_round * rounds, gpu=True) for o, i in per_layer.values()) * m["layers"]
    kept = min(keep_rounds, cum // stack if stack else 0)
    dense_from = min(-(-min(o, i) // r_round) for o, i in per_layer.values())
    linear = sum(o * i for o, i in shapes(m, ALL).values()) * m["layers"]
    base_4bit = linear * (0.5 + 0.127 / 8) + 2 * m["vocab"] * m["hidden"] * 2  # nf4 + double-quant absmax; bf16 emb
    return {"targets": targets, "rank": rank, "clients_per_round": clients, "rounds": rounds,
            "update_per_client_gb": round(sum(4 * rank * (o + i) for o, i in per_layer.values()) * m["layers"] / GB, 4),
            "round_stack_gb": round(stack / GB, 4), "first_dense_round": dense_from,
            "checkpoint_gb": round((cum + kept * stack) / GB, 3), "catch_up_gb": round(cum / GB, 3),
            "gpu_delta_gb": round(gpu / GB, 3), "base_4bit_gb": round(base_4bit / GB, 2),
            "over_2gib": cum > 2**31 - 1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "simulations/bench/results/flora_size.json"))
    a = ap.parse_args()
    rows = [sizes(MISTRAL_7B, t, a.rank, a.clients, n)
            for t in (["q_proj", "v_proj"], ALL[:4], ALL)
            for n in sorted({1, 10, 50, a.rounds})]
    print("targets | rounds | checkpoint GB | catch-up GB | GPU ΔW GB (4-bit base GB) | dense from round | > 2 GiB")
    for r in rows:
        print(f"{','.join(t[0] if t != 'gate_proj' else 'g' for t in r['targets'])} | {r['rounds']} | "
              f"{r['checkpoint_gb']} | {r['catch_up_gb']} | {r['gpu_delta_gb']} ({r['base_4bit_gb']}) | "
              f"{r['first_dense_round']} | {r['over_2gib']}")
    peaks = []  # the factored form just below the switch to dense is bigger than the dense one: peaks mid-run
    for t in (["q_proj", "v_proj"], ALL[:4], ALL):
        run = [sizes(MISTRAL_7B, t, a.rank, a.clients, n) for n in range(1, a.rounds + 1)]
        top = max(run, key=lambda r: r["catch_up_gb"])
        peaks.append({"targets": t, "peak_catch_up_gb": top["catch_up_gb"], "at_round": top["rounds"],
                      "peak_checkpoint_gb": max(r["checkpoint_gb"] for r in run),
                      "peak_gpu_delta_gb": max(r["gpu_delta_gb"] for r in run),
                      "over_8gb_from_round": next((r["rounds"] for r in run if r["catch_up_gb"] > 8), None)})
        print(f"{'+'.join(x.removesuffix('_proj') for x in t)}: peak over {a.rounds} rounds: catch-up "
              f"{top['catch_up_gb']} GB (round {top['rounds']}), checkpoint {peaks[-1]['peak_checkpoint_gb']} GB, GPU ΔW "
              f"{peaks[-1]['peak_gpu_delta_gb']} GB; catch-up > 8 GB from round {peaks[-1]['over_8gb_from_round']}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"model": "Mistral-7B-v0.3 shapes", "shapes": MISTRAL_7B, "results": rows,
                                        "peaks": peaks}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
