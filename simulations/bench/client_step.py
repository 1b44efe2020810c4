"""fedtune's local trainer vs a plain peft training loop on the same work, side by side.

Both train the same LoRA (q,v) on the same batches; runs alternate A/B/A/B so machine noise hits both.
Prints s/step for each and the ratio fedtune / plain (goal ≤ 1.05); writes JSON.

    python simulations/bench/client_step.py [--model smollm2|tiny] [--steps 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedtune.algorithms.common.lora import activate, attach_lora
from fedtune.data import ChatFormatter, collate, load_chatterbot
from fedtune.models import load_model
from fedtune.training.loop import LocalTrainConfig, batches, train_local


def plain_peft_loop(model, feats, cfg: LocalTrainConfig, pad_id: int) -> None:
    """What a peft README example does: AdamW over trainable params, forward/backward/step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stream = batches(feats, cfg.batch_size, cfg.seed, pad_id)
    model.train()
    for _ in range(cfg.steps):
        loss = model(**next(stream)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default="simulations/bench/results/client_step.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    model = attach_lora(model, adapter="default", rank=8, alpha=16, targets=["q_proj", "v_proj"])
    activate(model, "default")
    feats = [f for f in ChatFormatter(tok, a.seq).many(load_chatterbot()[:400]) if len(f["input_ids"]) >= a.seq][:64]
    feats = feats or ChatFormatter(tok, a.seq).many(load_chatterbot()[:64])
    cfg = LocalTrainConfig(steps=a.steps, batch_size=8, lr=1e-4)
    pad = tok.pad_token_id
    collate(feats[:8], pad)  # warm-up
    plain_peft_loop(model, feats, LocalTrainConfig(steps=1, batch_size=8), pad)
    times = {"fedtune": [], "plain_peft": []}
    for _ in range(a.repeats):
        for name in ("fedtune", "plain_peft"):
            t = time.perf_counter()
            if name == "fedtune":
                train_local(model, feats, cfg, pad_id=pad)
            else:
                plain_peft_loop(model, feats, cfg, pad)
            times[name].append((time.perf_counter() - t) / a.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # noise from other processes only adds time
    res = {"model": a.model, "batch": [8, a.seq], "threads": torch.get_num_threads(), "s_per_step": med,
           "s_per_step_min": best, "ratio_fedtune_over_plain": med["fedtune"] / med["plain_peft"],
           "ratio_min": best["fedtune"] / best["plain_peft"], "samples": times}
    print(f"{a.model}: fedtune {med['fedtune']:.3f} s/step | plain peft {med['plain_peft']:.3f} s/step | "
          f"ratio {res['ratio_fedtune_over_plain']:.3f} (median), {res['ratio_min']:.3f} (best of {a.repeats}) "
          "(goal ≤ 1.05)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
