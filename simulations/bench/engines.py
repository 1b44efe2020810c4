"""fedtune's in-process simulation vs Flower's simulation engine (Ray) on the same federated-LoRA workload.

Workload: random Llama (hidden 256, 4 layers: model "tiny-256x4"), FedAvg-LoRA q,v r=8, 8 clients (iid
chatterbot shards), 10 local steps of batch 8 × max_seq_len 32 per client per round. Each engine runs in
its own child process; the parent samples the RSS of that whole process tree (child + every descendant:
Ray's GCS, raylet, workers, actors) every 0.2 s.

Reported per engine: time to first round (process start → round-1 metrics row written: imports, model and
data, Ray start-up, round 1), wall per round (engine-measured `wall_s`, round 1 and mean of later rounds),
total process wall, peak tree RSS (Σ RSS over processes: shared pages count once per process, so it
overstates; it is what `top` would add up), bytes up/down per round.

Engines: native (clients one by one, torch's default intra-op threads, = CPUs: [federation] workers = 1),
native-1t (torch.set_num_threads(1), what each 1-CPU Ray actor gets), native-batched / native-batched-1t (a
round's clients in one batched forward/backward: [federation] batch_clients = true, workers = 1),
native-threads (the default, workers = 0: one worker thread per CPU, 1 torch thread each, each client on its
own adapter fork of the shared base; bit-identical to one by one), native-threads-batched (the same with
batch_clients: one batched loop per worker over its group of clients), flower (run_simulation, Ray, --actors
actors × 1 CPU; clients train in parallel).

Bound (printed when flower and native-1t or native-batched-1t ran): the one-thread engine's round is all of a
round's work on one core; split perfectly over the CPUs it is the least wall per round any in-process schedule of
the same client steps can take, and the import time of a fresh interpreter plus that split of round 1 the least
time to the first round. Each ÷ Flower's figure is the best ratio reachable without cheaper client steps (which
Flower's actors, running the same client code, would get too).

    python simulations/bench/engines.py --rounds 3 [--engines native native-1t flower] [--actors 2]

Scaling (--scale N1 N2, e.g. 2 20, with --model): the same engines at N1 and N2 clients (every client every
round); for each engine the extra peak tree RSS per extra client ÷ the base model's size (its parameter bytes).
A model copy per simulated client costs ≥ 1.0; one shared base per process, only the clients' data and
adapters (goal ≤ 0.1 for Flower, whose actors held a deep copy per node before: 1.19).

    python simulations/bench/engines.py --scale 2 20 --model tiny-512x8 --rounds 2 --steps 3 \
        --engines native-1t flower --json simulations/bench/results/engines_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ["native", "native-1t", "native-batched", "native-batched-1t", "native-threads", "native-threads-batched",
           "flower"]


def workload(rounds: int, out: str, actors: int) -> dict:
    return {
        "run.name": "bench-engines", "run.seed": 0, "run.rounds": rounds, "run.algorithm": "fedavg", "run.out": out,
        "model.name": "tiny-256x4", "federation.num_clients": 8, "data.partition": "iid",
        "data.max_train_per_client": 80, "data.max_eval_per_client": 8, "data.max_seq_len": 32,
        "train.local_steps": 10, "train.batch_size": 8, "train.lr": 1e-3,
        "fedavg.rank": 8, "fedavg.alpha": 16, "fedavg.target_modules": ["q_proj", "v_proj"],
        "flower.num_actors": actors, "flower.cpus_per_actor": 1,
    }


def worker(engine: str, rounds: int, out: str, actors: int, extra: dict | None = None) -> None:
    from fedtune import config

    over = {**workload(rounds, out, actors), **(extra or {})}
    over["federation.batch_clients"] = "batched" in engine  # one batched forward/backward per step for all clients
    over["federation.workers"] = 0 if "threads" in engine else 1  # 0: one worker thread per CPU (the default)
    cfg = config.load(None, over)
    if engine.endswith("-1t"):  # Ray gives each 1-CPU actor OMP_NUM_THREADS=1; this is native on equal terms
        import torch

        torch.set_num_threads(1)
    if engine.startswith("native"):
        from fedtune.run.assemble import simulate

        simulate(cfg, progress=False)
    else:
        from fedtune.run.flower import run_flower_simulation

        run_flower_simulation(cfg)


def tree_rss(pid: int, cpu: dict[int, float] | None = None) -> tuple[int, int]:
    """(Σ RSS, process count) of `pid` and its descendants; records each one's CPU seconds (user + system)
    so far into `cpu` (by pid: a process's last sample stands for it after it exits)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
            if cpu is not None:
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return total, len(procs)


def child_env() -> dict[str, str]:
    """This process's environment with this checkout first on PYTHONPATH (children import this fedtune)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


def measure(engine: str, rounds: int, actors: int, extra: dict | None = None) -> dict:
    out = tempfile.mkdtemp(prefix=f"bench-{engine}-")
    env = child_env()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", engine, "--rounds", str(rounds), "--out", out,
                             "--actors", str(actors), "--over", json.dumps(extra or {})], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "procs": 0}
    cpu: dict[int, float] = {}
    first_round: list[float] = []
    metrics = Path(out) / "metrics.jsonl"
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, n = tree_rss(proc.pid, cpu)
            peak["rss"] = max(peak["rss"], rss)
            peak["procs"] = max(peak["procs"], n)
            if not first_round and metrics.exists() and '"round": 1' in metrics.read_text():
                first_round.append(time.perf_counter() - t0)
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    log = proc.communicate()[0]
    total = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} run failed:\n{log[-4000:]}")
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()][1:]
    walls = [r["wall_s"] for r in rows]
    return {
        "engine": engine, "rounds": len(rows), "time_to_first_round_s": round(first_round[0], 2) if first_round else None,
        "round1_wall_s": walls[0], "later_round_wall_s_mean": round(sum(walls[1:]) / max(len(walls) - 1, 1), 3),
        "round_wall_s": walls, "process_wall_s": round(total, 2), "peak_tree_rss_mb": round(peak["rss"] / 2**20, 1),
        "max_processes": peak["procs"], "tree_cpu_s": round(sum(cpu.values()), 1), "bytes_up_per_round": rows[-1]["bytes_up"],
        "bytes_down_per_round": [r["bytes_down"] for r in rows], "final_eval_loss": rows[-1]["eval_loss"],
        "out": out,
    }


def import_floor(repeats: int = 3) -> float:
    """Seconds a fresh interpreter takes to import what a simulated run imports (fedtune, torch, transformers'
    Llama, peft), best of `repeats`: every engine pays it before its first round."""
    env = child_env()
    code = "import fedtune.run.assemble, fedtune.models.loading, transformers.models.llama.modeling_llama, peft"
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        best = min(best, time.perf_counter() - t)
    return best


def bounds(res: list[dict], cpus: int, imports_s: float) -> dict | None:
    """Floors for any in-process schedule of the same client steps: a one-thread engine's round (all of a round's
    work on one core) split perfectly over `cpus`, and for the first round the import time plus that split of
    round 1; each ÷ Flower's figure is the best ratio such a schedule can reach here."""
    by = {r["engine"]: r for r in res}
    one = [by[e] for e in ("native-1t", "native-batched-1t") if e in by]
    if "flower" not in by or not one:
        return None
    fl, best = by["flower"], min(one, key=lambda r: r["later_round_wall_s_mean"])
    later, first = best["later_round_wall_s_mean"] / cpus, imports_s + best["round1_wall_s"] / cpus
    return {"from_engine": best["engine"], "cpus": cpus, "imports_s": round(imports_s, 2),
            "later_round_floor_s": round(later, 3), "best_s_per_round_vs_flower": round(later / fl["later_round_wall_s_mean"], 3),
            "first_round_floor_s": round(first, 2),
            "best_first_round_vs_flower": round(first / fl["time_to_first_round_s"], 3)
            if fl["time_to_first_round_s"] else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    ap.add_argument("--actors", type=int, default=2, help="Ray actors (1 CPU each) for the flower engine")
    ap.add_argument("--json", default=str(ROOT / "simulations/bench/results/engines.json"))
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--over", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--scale", nargs=2, type=int, metavar=("N1", "N2"), help="clients at two sizes: RSS per client")
    ap.add_argument("--model", default="tiny-256x4", help="with --scale: the base model")
    ap.add_argument("--steps", type=int, default=10, help="with --scale: local steps per client per round")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.rounds, a.out, a.actors, json.loads(a.over))
        return
    if a.scale:
        scale(a)
        return
    import torch

    load = [os.getloadavg()[0]]
    res = [measure(e, a.rounds, a.actors) for e in a.engines]
    load.append(os.getloadavg()[0])
    ref = next((r for r in res if r["engine"] == "flower"), None)
    for r in res:  # the goals are ratios to Flower/Ray in the same run
        for key, name in [("later_round_wall_s_mean", "s_per_round"), ("peak_tree_rss_mb", "peak_rss"),
                          ("time_to_first_round_s", "first_round")]:
            r[f"{name}_vs_flower"] = round(r[key] / ref[key], 3) if ref and r[key] and ref[key] else None
    cols = [("engine", "engine", "{}"), ("first round s", "time_to_first_round_s", "{}"),
            ("round 1 s", "round1_wall_s", "{:.2f}"), ("later rounds s", "later_round_wall_s_mean", "{:.2f}"),
            ("total s", "process_wall_s", "{:.1f}"), ("CPU s", "tree_cpu_s", "{:.1f}"),
            ("peak RSS MB", "peak_tree_rss_mb", "{:.0f}"), ("procs", "max_processes", "{}"),
            ("eval loss", "final_eval_loss", "{:.4f}"), ("s/round ÷ flower", "s_per_round_vs_flower", "{}"),
            ("RSS ÷ flower", "peak_rss_vs_flower", "{}"), ("first round ÷ flower", "first_round_vs_flower", "{}")]
    print(f"load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} CPUs")
    print(" | ".join(c[0] for c in cols))
    for r in res:
        print(" | ".join("-" if r[k] is None else f.format(r[k]) for _, k, f in cols))
    cpus = len(os.sched_getaffinity(0))
    floor = bounds(res, cpus, import_floor())
    if floor:
        print(f"bound ({floor['from_engine']}'s round split over {cpus} CPUs; imports {floor['imports_s']} s): "
              f"later rounds ≥ {floor['later_round_floor_s']} s → s/round ÷ flower ≥ "
              f"{floor['best_s_per_round_vs_flower']}; first round ≥ {floor['first_round_floor_s']} s → first round "
              f"÷ flower ≥ {floor['best_first_round_vs_flower']} (for the same client steps)")
    doc = {"workload": "fedavg LoRA q,v r=8, tiny-256x4 Llama, 8 clients x 10 steps x batch 8x32",
           "bounds": floor, "rounds": a.rounds, "flower_actors": a.actors, "cpus": os.cpu_count(), "torch": torch.__version__,
           "native_torch_threads": torch.get_num_threads(), "load_average_1min": load, "results": res}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(doc, indent=2))
    print(f"wrote {a.json}")


def model_bytes(name: str) -> int:
    """The base model's parameter bytes as a run loads it (float32 on CPU)."""
    from fedtune import config
    from fedtune.models.loading import load_for

    base = load_for(config.load(None, {"model.name": name}), train=True)
    return sum(p.numel() * p.element_size() for p in base.model.parameters())


def scale(a: argparse.Namespace) -> None:
    """Each engine at N1 and N2 clients: peak RSS and s/round; extra RSS per extra client ÷ the base's size."""
    import torch

    n1, n2 = a.scale
    size = model_bytes(a.model)
    load = [os.getloadavg()[0]]
    rows = []
    for e in a.engines:
        runs = {n: measure(e, a.rounds, a.actors, {"model.name": a.model, "federation.num_clients": n,
                                                    "train.local_steps": a.steps, "data.max_train_per_client": 32})
                for n in (n1, n2)}
        extra = (runs[n2]["peak_tree_rss_mb"] - runs[n1]["peak_tree_rss_mb"]) * 2**20 / (n2 - n1)
        rows.append({"engine": e, "runs": runs, "extra_rss_per_client_mb": round(extra / 2**20, 1),
                     "extra_rss_per_client_vs_base": round(extra / size, 3)})
    load.append(os.getloadavg()[0])
    print(f"model {a.model}: {size / 2**20:.1f} MB of parameters; {a.actors} Ray actors; load {load[0]:.2f} / "
          f"{load[1]:.2f} on {os.cpu_count()} CPUs")
    print(f"engine | peak RSS MB at {n1} / {n2} | s/round at {n1} / {n2} | extra RSS per client MB | ÷ base")
    for r in rows:
        x, y = r["runs"][n1], r["runs"][n2]
        print(f"{r['engine']} | {x['peak_tree_rss_mb']:.0f} / {y['peak_tree_rss_mb']:.0f} | "
              f"{x['later_round_wall_s_mean']:.2f} / {y['later_round_wall_s_mean']:.2f} | "
              f"{r['extra_rss_per_client_mb']} | {r['extra_rss_per_client_vs_base']}")
    doc = {"workload": f"fedavg LoRA q,v r=8, {a.model}, {n1} and {n2} clients x {a.steps} steps x batch 8x32",
           "model_param_bytes": size, "rounds": a.rounds, "flower_actors": a.actors, "cpus": os.cpu_count(),
           "torch": torch.__version__, "load_average_1min": load, "results": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(doc, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
