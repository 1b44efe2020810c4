"""fedtune's client LoRA step vs the plain transformers + peft (+ bitsandbytes) step, per precision mode.

Same model files, same fixed random token batch, same LoRA (r=16, alpha 32, q,k,v,o on the CPU), AdamW (lr 1e-4,
grad-norm clip 1.0 in both, as fedtune's trainer does by default). Modes: fp32, bf16 (base in bfloat16), nf4
(bitsandbytes 4-bit NormalFloat, double quantization, bf16 compute; peft's prepare_model_for_kbit_training), each
with and without gradient checkpointing (non-reentrant). Each (model, mode, gc, variant) runs in a FRESH child
process (this script with --one ...): peak RSS (ru_maxrss, VmHWM) never goes down, so it is only per-mode in its
own process; it includes the load. The plain and the fedtune child of a mode run back to back (order alternating
from mode to mode) so machine noise hits both. Time = median (and min) of --steps steps after one warm-up step.

  plain    AutoModelForCausalLM.from_pretrained(dir, dtype, BitsAndBytesConfig for nf4) → prepare_model_for_kbit_
           training (nf4) / gradient_checkpointing_enable (gc) → get_peft_model → AdamW; forward/backward/clip/step
  fedtune  fedtune.models.load_model(dir, device, dtype, quantization) → hardware.prepare_for_training →
           FedAvg's LoRAClient setup/sync → client.train(steps=1) per timed step (a whole client round of one step:
           fresh AdamW, train, upload copy, reset to the global adapter)

Models: "smollm2" (SmolLM2-135M, fedtune's offline cache dir), "llama1b" (random Llama, TinyLlama-1.1B shape,
vocab 49,152), "mistral7b" (random Llama, Mistral-7B shape: hidden 4096, 32 layers, intermediate 14336, 32 heads,
8 KV heads, vocab 32768), "llama-tiny" (--quick). Random models are built once with seed 0 and saved in bfloat16
under --cache (default ~/.cache/fedtune/bench/), never in the repo; both variants load those files.

    PYTHONPATH=. .venv/bin/python simulations/bench/hardware.py [--models smollm2,llama1b] [--modes fp32,bf16,nf4]
        [--gc both|on|off] [--steps 3] [--out PATH] [--quick]
    PYTHONPATH=. python simulations/bench/hardware.py --device cuda     # GPU: mistral7b nf4, r=32, 16×512, gc on,
        # peak GPU memory (goal ≤ 17 GB), tokens/s, and 8 simulated clients sharing the base (forks)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARK = "HWBENCH_JSON "
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# (vocab, hidden, layers, intermediate, heads, kv heads)
SHAPES = {
    "llama1b": (49152, 2048, 22, 5632, 32, 4),
    "mistral7b": (32768, 4096, 32, 14336, 32, 8),
    "llama-tiny": (1024, 64, 2, 128, 4, 2),
}
MODES = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "nf4": ("bfloat16", "nf4")}
# per model: (batch, seq) on the CPU, as in the issue's reference numbers
CPU_BATCH = {"smollm2": (4, 256), "llama1b": (2, 128), "llama-tiny": (2, 32), "mistral7b": (1, 64)}
# the issue's plain transformers 5.23 + peft 0.21 + bitsandbytes 0.50.2 numbers (s/step, peak RSS MB), gc off
REFERENCE = {("smollm2", "fp32"): (6.17, 3762), ("smollm2", "bf16"): (3.88, 2594), ("smollm2", "nf4"): (4.05, 2910),
             ("llama1b", "fp32"): (22.8, 7134), ("llama1b", "bf16"): (3.88, 3581), ("llama1b", "nf4"): (17.1, 3952)}


# ----------------------------------------------------------------------------------------------- child side
def vm_hwm_mb() -> float:
    from fedtune.models.memory import status  # fedtune's one way to read memory (no other fedtune code loads)

    try:
        return round(status("VmHWM") / 2**20, 1)
    except (OSError, KeyError):
        return float("nan")


def ru_maxrss_mb() -> float:
    from fedtune.models.memory import peak_rss_mb

    return peak_rss_mb()


def build_random_llama(name: str, cache: Path, device: str) -> dict:
    """Save the random `name`-shape Llama (seed 0, bfloat16) + a small tokenizer under cache/name, once."""
    d = cache / name
    if (d / "config.json").is_file():
        return {"dir": str(d), "built": False}
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.models.tiny import tiny_tokenizer

    vocab, hidden, layers, inter, heads, kv = SHAPES[name]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    t = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built (and randomly initialised) in bf16: half the memory
    with torch.device(device):  # a 7B shape initialises in seconds on a GPU, minutes on a CPU
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = torch.bfloat16
    tmp = d.with_name(f"{d.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tiny_tokenizer().save_pretrained(tmp)
    try:
        tmp.rename(d)
    except OSError:  # another process won the race
        pass
    return {"dir": str(d), "built": True, "build_s": round(time.perf_counter() - t, 1),
            "params": sum(p.numel() for p in model.parameters())}


def prepare_child(a) -> dict:
    """Build missing random models, resolve the SmolLM2 dir, warm fedtune's base-fingerprint cache (a bf16/nf4
    load hashes the float32 checkpoint once; cached by file names, sizes and mtimes) so every measured child
    sees the steady state."""
    from transformers import AutoConfig

    from fedtune.models.loading import _dir_fingerprint, hf_dir, load_model

    out = {}
    for name in a.models.split(","):
        if name == "smollm2":
            d = hf_dir("smollm2")
            if d is None:  # first use: fedtune dequantises the GGUF into its cache dir
                load_model("smollm2")
                d = hf_dir("smollm2")
            info = {"dir": str(d), "built": False}
        elif name in SHAPES:
            info = build_random_llama(name, Path(a.cache).expanduser(), "cuda" if a.device == "cuda" else "cpu")
        else:
            raise SystemExit(f"unknown model {name!r}: use smollm2, {', '.join(SHAPES)}")
        t = time.perf_counter()
        _dir_fingerprint(Path(info["dir"]), AutoConfig.from_pretrained(info["dir"]))
        info["fingerprint_s"] = round(time.perf_counter() - t, 2)
        out[name] = info
    return out


def random_batch(vocab: int, batch: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, min(vocab, 32000), (batch, seq), generator=g)
    return ids


def lora_param_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


def one(a) -> dict:
    """One variant of one mode in this (fresh) process: load, prepare, warm-up step, a.steps timed steps."""
    t_start = time.perf_counter()
    import torch

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA GPU")
    dtype_name, quant = MODES[a.mode]
    dtype = getattr(torch, dtype_name)
    gc = bool(a.gc_on)
    res: dict = {"variant": a.variant, "model": a.model_name, "mode": a.mode, "gc": gc, "device": str(dev),
                 "batch": a.batch, "seq": a.seq, "rank": a.rank, "targets": a.targets.split(","),
                 "threads": torch.get_num_threads()}
    t = time.perf_counter()
    if a.variant == "plain":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kw: dict = {"dtype": dtype}
        if quant == "nf4":
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
            kw["device_map"] = {"": dev}
        model = AutoModelForCausalLM.from_pretrained(a.dir, **kw)
        if quant == "none":
            model.to(dev)
        res["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if quant == "nf4":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=res["targets"],
                                                 lora_dropout=0.0, bias="none"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        ids = random_batch(model.config.vocab_size, a.batch, a.seq).to(dev)
        mask = torch.ones_like(ids)
        model.train()
        res["setup_s"] = time.perf_counter() - t

        def step() -> float:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
    else:
        from fedtune.algorithms import TrainContext, get_algorithm
        from fedtune.algorithms.fedavg import FedAvgConfig
        from fedtune.models import load_model
        from fedtune.models.hardware import hardware_metrics, prepare_for_training
        from fedtune.models.memory import peak_memory_mb

        model, tok = load_model(a.dir, device=a.device, dtype=dtype_name, quantization=quant)
        res["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model = prepare_for_training(model, gradient_checkpointing=gc)
        algo = get_algorithm("fedavg", FedAvgConfig(rank=a.rank, alpha=2 * a.rank, target_modules=res["targets"]))
        state = algo.initialize(model, seed=0)
        client = algo.make_client()
        model = client.setup(model, algo.setup_payload(state))
        client.sync(model, algo.sync_payload(state, -1))
        ids = random_batch(model.config.vocab_size, a.batch, a.seq)
        feats = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
        ctx = TrainContext("client-0", feats, tok.pad_token_id)
        cfg = {"steps": 1, "batch_size": a.batch, "grad_accum": 1, "lr": 1e-4, "seed": 0}
        res["setup_s"] = time.perf_counter() - t
        res["hardware_metrics"] = hardware_metrics(model)

        def step() -> float:
            return client.train(model, ctx, cfg).metrics["train_loss"]

    res["lora_params"] = lora_param_count(model)
    if cuda:
        torch.cuda.synchronize(dev)
        res["cuda_after_setup_mb"] = round(torch.cuda.memory_allocated(dev) / 2**20, 1)
    res["rss_after_setup_mb"] = vm_hwm_mb()
    t = time.perf_counter()
    res["loss_warmup"] = step()
    if cuda:
        torch.cuda.synchronize(dev)
    res["warmup_s"] = time.perf_counter() - t
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    res["step_s"] = times
    res["s_per_step"] = statistics.median(times)
    res["s_per_step_min"] = min(times)
    res["tokens_per_s"] = a.batch * a.seq / res["s_per_step"]
    res["peak_rss_mb"] = ru_maxrss_mb()  # what hardware.peak_memory_mb reports (load included)
    res["vm_hwm_mb"] = vm_hwm_mb()
    if cuda:
        res["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        res["cuda_reserved_peak_mb"] = round(torch.cuda.max_memory_reserved(dev) / 2**20, 1)
    if a.variant == "fedtune":
        res["fedtune_peak_memory_mb"] = peak_memory_mb(dev)  # the per-client metric, after load + train
        if a.same_model:
            res["same_model"] = same_model_check(a, model, client, algo, state, step, dev)
        if a.clients:
            res["clients"] = simulated_clients(a, model, client, ctx, cfg, dev, res)
    res["wall_s"] = time.perf_counter() - t_start
    return res


def same_model_check(a, model, client, algo, state, fed_step, dev) -> dict:
    """fedtune's overhead without the process-to-process noise: on this one model, a.steps interleaved pairs of
    (the plain loop's step with a persistent AdamW, client.train of one step), order alternating."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = random_batch(model.config.vocab_size, a.batch, a.seq).to(dev)
    mask = torch.ones_like(ids)

    def plain_step() -> None:
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    plain_step()  # its AdamW state, once
    times: dict[str, list[float]] = {"plain": [], "fedtune": []}
    for i in range(a.steps):
        for name in (("plain", "fedtune") if i % 2 == 0 else ("fedtune", "plain")):
            t = time.perf_counter()
            if name == "plain":
                plain_step()
            else:
                fed_step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[name].append(time.perf_counter() - t)
    client.sync(model, algo.sync_payload(state, -1))  # back at the global adapter
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"step_s": times, "s_per_step": med, "ratio": med["fedtune"] / med["plain"],
            "ratio_min": min(times["fedtune"]) / min(times["plain"])}


def simulated_clients(a, model, client, ctx, cfg, dev, one_res: dict) -> dict:
    """a.clients simulated clients on this device sharing the frozen base: one fork per client (own LoRA
    factors, the base's tensors shared, as fedtune's worker-thread engine does), each trains one round of one
    step in turn. Bound (goal): peak ≤ base + one client's activations (the single-client peak − base, which also
    holds its grads and AdamW moments) + N adapters' state (LoRA weights + grads + AdamW m, v: 16 B/param)."""
    import torch

    from fedtune.algorithms import TrainContext

    cuda = dev.type == "cuda"
    forks = [model] + [client.fork(model) for _ in range(a.clients - 1)]
    losses, times = [], []
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    for i, m in enumerate(forks):
        t = time.perf_counter()
        c_ctx = TrainContext(f"client-{i}", ctx.features, ctx.pad_id)
        losses.append(client.train(m, c_ctx, dict(cfg, seed=i)).metrics["train_loss"])
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    out = {"n": a.clients, "s_per_client": times, "losses": losses,
           "adapter_state_mb": round(one_res["lora_params"] * 16 / 2**20, 1)}
    if cuda:
        base = one_res["cuda_after_setup_mb"]
        one_act = one_res["cuda_peak_mb"] - base
        out |= {"cuda_peak_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1), "base_mb": base,
                "one_client_mb": round(one_act, 1)}
        out["bound_mb"] = round(base + one_act + a.clients * out["adapter_state_mb"], 1)
        out["within_bound"] = out["cuda_peak_mb"] <= out["bound_mb"]
    else:
        out["peak_rss_mb"] = ru_maxrss_mb()
    return out


# ---------------------------------------------------------------------------------------------- parent side
def run_child(args: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                       env=env, check=False, timeout=timeout, cwd=REPO)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    sys.stderr.write(p.stdout[-4000:] + p.stderr[-8000:])
    raise SystemExit(f"child {' '.join(args)} failed (rc {p.returncode})")


def fmt_ratio(x: float) -> str:
    return f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help="comma list: smollm2, llama1b, mistral7b, llama-tiny "
                    "(default smollm2,llama1b on the CPU, mistral7b with --device cuda)")
    ap.add_argument("--modes", default=None, help="comma list of fp32, bf16, nf4 (default all; nf4 with cuda)")
    ap.add_argument("--gc", choices=["both", "on", "off"], default=None, help="gradient checkpointing "
                    "(default both; on with cuda)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per child (after one warm-up)")
    ap.add_argument("--batch", type=int, default=None, help="override batch size (default per model)")
    ap.add_argument("--seq", type=int, default=None, help="override sequence length (default per model)")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (default 16; 32 with cuda)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--clients", type=int, default=None, help="after the fedtune timing, this many simulated "
                    "clients sharing the base (default 0; 8 with cuda)")
    ap.add_argument("--same-model", type=int, default=1, help="1: each fedtune child also times the plain step "
                    "and client.train interleaved on its one model (fedtune's overhead without process noise)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "fedtune" / "bench"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="llama-tiny, 2×32, 2 steps, 2 clients: proves it runs")
    ap.add_argument("--child-timeout", type=float, default=1800)
    # child-only
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--gc-on", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--model-name", help=argparse.SUPPRESS)
    a = ap.parse_args()
    cuda = a.device == "cuda"
    if a.one:
        print(MARK + json.dumps(one(a)), flush=True)
        return
    if a.prepare:
        print(MARK + json.dumps(prepare_child(a)), flush=True)
        return

    if a.quick:
        a.models = a.models or "llama-tiny"
        a.steps = min(a.steps, 2)
        a.clients = 2 if a.clients is None else a.clients
    a.models = a.models or ("mistral7b" if cuda else "smollm2,llama1b")
    a.modes = a.modes or ("nf4" if cuda else "fp32,bf16,nf4")
    a.gc = a.gc or ("on" if cuda else "both")
    a.rank = a.rank or (32 if cuda else 16)
    a.clients = (8 if cuda else 0) if a.clients is None else a.clients
    a.out = a.out or f"simulations/bench/results/hardware{'-cuda' if cuda else ''}{'-quick' if a.quick else ''}.json"
    models, modes = a.models.split(","), a.modes.split(",")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}: use {', '.join(MODES)}")
    if cuda:
        code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
        probe = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
        if probe.returncode != 0:
            raise SystemExit("--device cuda: torch sees no CUDA GPU here (a CPU build of torch or no driver); run "
                             "without --device cuda, or on a GPU machine with a CUDA build of torch and bitsandbytes")
    gcs = {"both": [False, True], "on": [True], "off": [False]}[a.gc]
    t0 = time.perf_counter()
    prep = run_child(["--prepare", "--models", a.models, "--device", a.device, "--cache", a.cache], a.child_timeout)
    built = {k: f" (built in {v['build_s']:.0f} s)" if v.get("built") else "" for k, v in prep.items()}
    print(f"prepared in {time.perf_counter() - t0:.1f} s: " +
          "; ".join(f"{k}: {v['dir']}{built[k]}, fingerprint {v['fingerprint_s']:.1f} s" for k, v in prep.items()),
          flush=True)

    rows = []
    k = 0
    for name in models:
        b, s = CPU_BATCH.get(name, (2, 128)) if not cuda else (16, 512)
        b, s = a.batch or b, a.seq or s
        for mode in modes:
            for gc in gcs:
                order = ("plain", "fedtune") if k % 2 == 0 else ("fedtune", "plain")
                k += 1
                got = {}
                for variant in order:
                    args = ["--one", "--variant", variant, "--mode", mode, "--gc-on", str(int(gc)), "--dir",
                            prep[name]["dir"], "--model-name", name, "--device", a.device, "--batch", str(b),
                            "--seq", str(s), "--steps", str(a.steps), "--rank", str(a.rank), "--targets", a.targets,
                            "--clients", str(a.clients if variant == "fedtune" else 0),
                            "--same-model", str(a.same_model)]
                    got[variant] = run_child(args, a.child_timeout)
                p, f = got["plain"], got["fedtune"]
                row = {"model": name, "mode": mode, "gc": gc, "batch": b, "seq": s, "order": list(order),
                       "plain": p, "fedtune": f,
                       "ratio_time": f["s_per_step"] / p["s_per_step"],
                       "ratio_time_min": f["s_per_step_min"] / p["s_per_step_min"],
                       "ratio_peak_rss": f["peak_rss_mb"] / p["peak_rss_mb"],
                       "fedtune_metric_mem_peak_mb": f["fedtune_peak_memory_mb"]["mem_peak_mb"]}
                if "same_model" in f:
                    row["ratio_time_same_model"] = f["same_model"]["ratio"]
                if cuda:
                    row["ratio_cuda_peak"] = f["cuda_peak_mb"] / p["cuda_peak_mb"]
                rows.append(row)
                print(f"{name:9s} {mode:4s} gc {'on ' if gc else 'off'} | plain {p['s_per_step']:7.3f} s "
                      f"{p['peak_rss_mb']:8.0f} MB | fedtune {f['s_per_step']:7.3f} s {f['peak_rss_mb']:8.0f} MB | "
                      f"time {row['ratio_time']:.3f} (min {row['ratio_time_min']:.3f}, same model "
                      f"{row.get('ratio_time_same_model', float('nan')):.3f}) peak {row['ratio_peak_rss']:.3f}"
                      + (f" | GPU {p['cuda_peak_mb']:.0f} / {f['cuda_peak_mb']:.0f} MB" if cuda else ""), flush=True)

    speedups = {}
    for name in models:
        for gc in gcs:
            r = {x["mode"]: x for x in rows if x["model"] == name and x["gc"] == gc}
            if "fp32" in r and "bf16" in r:
                speedups[f"{name} gc {'on' if gc else 'off'}"] = {
                    v: r["fp32"][v]["s_per_step"] / r["bf16"][v]["s_per_step"] for v in ("fedtune", "plain")}

    # ---- table
    print()
    head = ("| model | mode | gc | batch×seq | plain s/step | fedtune s/step | time ÷ (median) | time ÷ (min) | "
            "same-model time ÷ | plain peak MB | fedtune peak MB | peak ÷ | fedtune mem_peak_mb metric | loss plain / fedtune |")
    if cuda:
        head += " plain GPU MB | fedtune GPU MB | GPU ÷ | tokens/s fedtune |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        p, f = r["plain"], r["fedtune"]
        line = (f"| {r['model']} | {r['mode']} | {'on' if r['gc'] else 'off'} | {r['batch']}×{r['seq']} | "
                f"{p['s_per_step']:.3f} | {f['s_per_step']:.3f} | {fmt_ratio(r['ratio_time'])} | "
                f"{fmt_ratio(r['ratio_time_min'])} | {fmt_ratio(r.get('ratio_time_same_model', float('nan')))} | "
                f"{p['peak_rss_mb']:,.0f} | {f['peak_rss_mb']:,.0f} | "
                f"{fmt_ratio(r['ratio_peak_rss'])} | {r['fedtune_metric_mem_peak_mb']:,.0f} | "
                f"{p['loss_warmup']:.4f} / {f['loss_warmup']:.4f} |")
        if cuda:
            line += (f" {p['cuda_peak_mb']:,.0f} | {f['cuda_peak_mb']:,.0f} | {fmt_ratio(r['ratio_cuda_peak'])} | "
                     f"{f['tokens_per_s']:,.0f} |")
        print(line)
    worst_t = max((r["ratio_time"] for r in rows), default=float("nan"))
    worst_m = max((r["ratio_peak_rss"] for r in rows), default=float("nan"))
    worst_same = max((r.get("ratio_time_same_model", float("nan")) for r in rows), default=float("nan"))
    print(f"\nworst same-model fedtune ÷ plain step time: {worst_same:.3f}")
    print(f"worst fedtune ÷ plain: time {worst_t:.3f}, peak RSS {worst_m:.3f} (goal ≤ 1.05 each: "
          f"{'met' if worst_t <= 1.05 and worst_m <= 1.05 else 'NOT met'})")
    for key, sp in speedups.items():
        print(f"bf16 speedup over fp32, {key}: fedtune {sp['fedtune']:.2f}×, plain {sp['plain']:.2f}× "
              f"(goal ≥ 4× on llama1b)")
    for r in rows:
        c = r["fedtune"].get("clients")
        if c and cuda:
            print(f"{r['model']} {r['mode']}: {c['n']} clients sharing the base: peak {c['cuda_peak_mb']:,.0f} MB "
                  f"≤ bound {c['bound_mb']:,.0f} MB (base {c['base_mb']:,.0f} + one client {c['one_client_mb']:,.0f} "
                  f"+ {c['n']} × {c['adapter_state_mb']:.0f} adapter state): {'met' if c['within_bound'] else 'NOT met'}"
                  f"; single-client GPU peak {r['fedtune']['cuda_peak_mb']:,.0f} MB (goal ≤ 17,000 MB / 17 GB: "
                  f"{'met' if r['fedtune']['cuda_peak_mb'] <= 17e3 else 'NOT met'}), "
                  f"{r['fedtune']['tokens_per_s']:,.0f} tokens/s")
        elif c:
            print(f"{r['model']} {r['mode']} gc {'on' if r['gc'] else 'off'}: {c['n']} clients sharing the base: "
                  f"peak RSS {c['peak_rss_mb']:,.0f} MB (single client {r['fedtune']['peak_rss_mb']:,.0f} MB), "
                  f"losses {[round(x, 4) for x in c['losses']]}")
    total = time.perf_counter() - t0
    print(f"total wall {total:.0f} s")
    out = {"device": a.device, "args": {k: v for k, v in vars(a).items() if k not in ("one", "prepare")},
           "prepared": prep, "rows": rows, "bf16_speedup_over_fp32": speedups, "worst_ratio_time": worst_t,
           "worst_ratio_peak_rss": worst_m,
           "worst_ratio_time_same_model": worst_same, "reference_plain_issue": {f"{m} {md}": v for (m, md), v in
                                                                   REFERENCE.items()}, "total_wall_s": total}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
