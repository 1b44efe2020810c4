"""The measured answer: every method, the baselines and DP on one workload, written to simulations/results/.

    PYTHONPATH=. python simulations/report.py --jobs 2        # SmolLM2 matrix (long; resumable: finished runs are kept)
    PYTHONPATH=. python simulations/report.py --only fedavg@0.003 --only local   # run just these entries
    PYTHONPATH=. python simulations/report.py --report-only    # rebuild JSON/MD/PNGs from the finished runs
    PYTHONPATH=. python simulations/report.py --model tiny --quick --runs /tmp/r --results /tmp/res  # seconds (CI)

Workload: simulations/report.toml (SmolLM2-135M-Instruct, chatterbot by category, 4 clients, 5 rounds). Matrix:
phase 1 runs each method at 3 learning rates (the lr sweep: the default is the value with the lowest final *eval*
loss, on the clients' held-out slices; methods are then compared on the separate global *test* set); phase 2 runs
FedAvg-LoRA and Fed-SB under sample-level DP at ε ∈ {1, 3, 8} at the lr the sweep picked for them, and the
local-only and centralized baselines (plain LoRA) at FedAvg-LoRA's pick. With --jobs N each entry runs in its own
process (N at a time; its peak RSS is written beside its run). Outputs: results/matrix.json (one row per run),
results/REPORT.md, results/*.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SWEEP = {  # FedAvg/FLoRA/Fed-SB: AdamW lr; FedKSeed (trainable = "lora"): the ZO step size η
    "fedavg": [3e-3, 1e-2, 3e-2],
    "flora": [3e-3, 1e-2, 3e-2],
    "fedsb": [1e-2, 3e-2, 1e-1, 3e-1],  # 0.1 won a 3-value grid: 0.3 brackets it
    "fedkseed": [1e-3, 3e-3, 1e-2],
}
BASELINES = ("local", "central", "central-seq")
# the centralized baselines also get a small lr sweep (besides FedAvg-LoRA's pick), so the federation is compared
# with a tuned centralized run, not one at the federation's lr
BASELINE_SWEEP = {"central": [3e-3, 3e-2], "central-seq": [3e-3, 3e-2]}
EPSILONS = [1.0, 3.0, 8.0]
DP_METHODS = ["fedavg", "fedsb"]
PROMPTS = 5


def default_lr(method: str) -> float:
    from fedtune import config

    return config.load(None, {"run.algorithm": method, "model.name": "tiny"}).learning_rate()


def matrix(quick: bool) -> dict[str, dict[str, Any]]:
    """{entry name: {"kind": method | baseline, "method": ..., "phase": 1 | 2, "overrides": {...}}}; phase-2
    entries (DP, baselines) take their lr from the finished sweep (resolve_lr)."""
    out: dict[str, dict[str, Any]] = {}
    for m, grid in SWEEP.items():
        for lr in grid[:1] if quick else grid:
            out[f"{m}@{lr:g}"] = {"kind": m, "method": m, "lr": lr, "phase": 1,
                                  "overrides": {"run.algorithm": m, f"{m}.lr": lr}}
    for m in DP_METHODS:
        for eps in EPSILONS[:1] if quick else EPSILONS:
            out[f"{m}-dp{eps:g}"] = {"kind": m, "method": m, "epsilon": eps, "phase": 2, "privacy": {
                "mode": "sample", "target_epsilon": eps, "noise_seed": 0}, "overrides": {"run.algorithm": m}}
    for b in BASELINES:  # plain LoRA (FedAvg's client)
        out[b] = {"kind": b, "method": "fedavg", "phase": 2, "overrides": {}}
        for lr in [] if quick else BASELINE_SWEEP.get(b, []):
            out[f"{b}@{lr:g}"] = {"kind": b, "method": "fedavg", "lr": lr, "phase": 2, "overrides": {}}
    return out


def _writer():
    """The sibling module simulations/report_write.py (collect, pick_defaults, write_report)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import report_write

    return report_write


def resolve_lr(spec: dict[str, Any], entries: dict[str, dict[str, Any]], runs: Path) -> float:
    """A sweep entry's own lr; for phase 2 the lr the finished sweep picked for its method (report_write's
    pick_defaults: lowest finite final eval loss), or the method's config default when none of its sweep runs has
    finished."""
    if spec.get("lr") is not None:
        return spec["lr"]
    w = _writer()
    sweep = {n: e for n, e in entries.items() if e["phase"] == 1 and e["method"] == spec["method"]}
    picks = w.pick_defaults(w.collect(sweep, runs))
    return picks[spec["method"]]["lr"] if spec["method"] in picks else default_lr(spec["method"])


def run_entry(name: str, spec: dict[str, Any], base: Path, runs: Path, overrides: dict[str, Any],
              entries: dict[str, dict[str, Any]], *, own_process: bool = False) -> Path:
    """Run one matrix entry into runs/<name> (skipped when its summary.json exists); returns the run dir.
    With own_process (the entry is the only one this process runs) writes the process's peak RSS to
    <run>/peak_rss_mb.txt; entries sharing a process get none (their peak would be the process's so far)."""
    from fedtune import config
    from fedtune.run.assemble import simulate

    out = runs / name.replace("@", "-lr")
    if (out / "summary.json").is_file():
        return out
    lr = resolve_lr(spec, entries, runs)
    ov = {**overrides, **spec["overrides"], f"{spec['method']}.lr": lr, "run.out": str(out), "run.name": name}
    for k, v in (spec.get("privacy") or {}).items():
        ov[f"privacy.{k}"] = v
    cfg = config.load(base, ov, other_methods=True)  # one file for every method of the matrix
    if spec["kind"] in BASELINES:
        from fedtune.run.baselines import simulate_baseline

        simulate_baseline(cfg, spec["kind"], progress=False)
    else:
        simulate(cfg, progress=False)
    if own_process:
        from fedtune.models.memory import peak_rss_mb  # the process's peak RSS, as every client reports it

        (out / "peak_rss_mb.txt").write_text(f"{peak_rss_mb():.1f}\n")
    return out


def run_all(names: list[str], entries: dict[str, dict[str, Any]], a: argparse.Namespace, runs: Path,
            overrides: dict[str, Any]) -> None:
    """Phase 1 (the sweep) before phase 2 (which needs its picks); with --jobs N, N entry processes at a time."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def child(name: str) -> None:
        if (runs / name.replace("@", "-lr") / "summary.json").is_file():
            return
        cmd = [sys.executable, __file__, "--config", a.config, "--runs", str(runs), "--only", name]
        cmd += (["--model", a.model] if a.model else []) + (["--quick"] if a.quick else [])
        r = subprocess.run(cmd, check=False)
        print(f"{'done' if r.returncode == 0 else f'FAILED ({r.returncode})'} {name}", flush=True)

    for phase in (1, 2):
        todo = [n for n in names if entries[n]["phase"] == phase]
        if a.jobs > 1:
            with ThreadPoolExecutor(a.jobs) as pool:
                list(pool.map(child, todo))
        else:
            for name in todo:
                run_entry(name, entries[name], Path(a.config), runs, overrides, entries)
                print(f"done {name}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "report.toml"))
    p.add_argument("--model", help="override [model] name (tiny: CI smoke run)")
    p.add_argument("--quick", action="store_true", help="one lr per method, one ε, 2 rounds × 1 step, few examples (with --model tiny: seconds)")
    p.add_argument("--only", action="append", help="run only this entry (repeatable); see --list")
    p.add_argument("--list", action="store_true", help="print the matrix entries and exit")
    p.add_argument("--report-only", action="store_true", help="do not train; report the finished runs")
    p.add_argument("--no-prompts", action="store_true", help="skip the generation table")
    p.add_argument("--task-examples", type=int, help="global test examples for the task metrics (Rouge-L, exact "
                   "match, multiple-choice accuracy); 0: none (default 64, --quick 8)")
    p.add_argument("--runs", default="runs/report", help="run dirs go here")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--jobs", type=int, default=1, help="entries run in N processes at once (each its own peak RSS)")
    p.add_argument("--notes", help="markdown file inserted near the top of REPORT.md (how the run went)")
    a = p.parse_args(argv)
    entries = matrix(a.quick)
    if a.list:
        print("\n".join(entries))
        return 0
    overrides: dict[str, Any] = {"model.name": a.model}
    if a.quick:
        overrides |= {"run.rounds": 2, "train.local_steps": 1, "data.max_eval_per_client": 4, "data.max_test_examples": 16,
                      "data.max_train_per_client": 32}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    runs = Path(a.runs)
    unknown = sorted(set(a.only or []) - set(entries))
    if unknown:
        p.error(f"unknown entries {unknown}; see --list")
    if not a.report_only:
        if a.only and a.jobs <= 1:  # also how each --jobs child runs its entry
            for name in a.only:
                run_entry(name, entries[name], Path(a.config), runs, overrides, entries, own_process=len(a.only) == 1)
            return 0
        run_all(a.only or list(entries), entries, a, runs, overrides)
        if a.only:
            return 0
    _writer().write_report(entries, runs, Path(a.results), prompts=0 if a.no_prompts else PROMPTS,
                 notes=Path(a.notes).read_text(encoding="utf-8") if a.notes else "",
                 task_examples=a.task_examples if a.task_examples is not None else (8 if a.quick else 64))
    return 0


if __name__ == "__main__":
    sys.exit(main())
