"""Did a change alter what fedtune computes? Run a fixed set of tiny simulations and record everything but time.

    python scripts/same_results.py record OUT.json [--work DIR]   # run the cases with the fedtune on sys.path
    python scripts/same_results.py compare A.json B.json          # exit 1 and list differences if any

Each case is `fedtune simulate --model tiny` (3 clients, 2 rounds, a few local steps) run in a fresh process.
Recorded per case: every metrics.jsonl row without wall_s and memory figures, summary.json's losses, ε and
fingerprints, and the sha256 of every tensor file the run wrote (adapter, merged model, last checkpoint), so
"same" means bit-identical adapters, merged weights and global state. To compare two trees, run `record` once
with each on PYTHONPATH (e.g. a `git worktree` of the old commit), then `compare`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# name: (extra CLI arguments, extra TOML)
CASES: dict[str, tuple[list[str], str]] = {
    "fedavg": (["--algorithm", "fedavg"], ""),
    "flora": (["--algorithm", "flora", "--save-merged"], "[flora]\nranks = [8, 4, 2]\n"),
    "fedsb": (["--algorithm", "fedsb"], ""),
    "fedkseed-full": (["--algorithm", "fedkseed"], "[fedkseed]\nnum_seeds = 64\nlr = 1e-3\n"),
    "fedkseed-lora": (["--algorithm", "fedkseed"], '[fedkseed]\nnum_seeds = 64\ntrainable = "lora"\nseed_sampling = "pro"\n'),
    "fedavg-sample-dp": (["--algorithm", "fedavg"], '[privacy]\nmode = "sample"\nnoise_multiplier = 1.0\nnoise_seed = 3\n'),
    "fedsb-client-dp": (["--algorithm", "fedsb"], '[privacy]\nmode = "client"\nnoise_multiplier = 0.5\nclip_norm = 0.5\n'),
    "fedavg-robust": (["--algorithm", "fedavg"], '[robust]\naggregator = "trimmed_mean"\ntrim_fraction = 0.34\n'),
    "flora-robust": (["--algorithm", "flora"], "[robust]\nnorm_bound_median_mult = 1.0\n"),
    "fedavg-batched": (["--algorithm", "fedavg"], "[federation]\nbatch_clients = true\nworkers = 1\n"),
}
VOLATILE = {"wall_s", "mem_peak_mb", "cuda_mem_peak_mb"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _scrub(obj):
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


def run_case(name: str, work: Path) -> dict:
    args, toml = CASES[name]
    out = work / name
    cfg = work / f"{name}.toml"
    cfg.write_text('[run]\nthreads = 1\n[train]\nlocal_steps = 3\nbatch_size = 4\n' + toml)
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "--config", str(cfg), "--model", "tiny", "--clients", "3",
           "--rounds", "2", "--seed", "1", "--out", str(out), "--no-progress", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       env=dict(os.environ, FEDTUNE_CACHE=str(work / "cache")))
    if p.returncode != 0:
        raise SystemExit(f"{name}: exit {p.returncode}\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((out / "summary.json").read_text())
    keep = ("rounds_completed", "epsilon", "delta", "eval_loss_first", "eval_loss_final", "test_loss_first",
            "test_loss_final", "client_eval_loss_final", "base_model_fingerprint", "global_model_fingerprint",
            "bytes_up_total", "bytes_down_total", "adapter_export", "clients")
    files = {str(f.relative_to(out)): _sha(f) for f in sorted(out.rglob("*.safetensors"))}
    return {"rows": _scrub(rows), "summary": {k: summary.get(k) for k in keep}, "files": files}


def record(path: Path, work: Path | None) -> None:
    import fedtune

    with tempfile.TemporaryDirectory() as tmp:
        base = work or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        result = {"fedtune": str(Path(fedtune.__file__).parent), "cases": {}}
        for name in CASES:
            print(f"{name} ...", flush=True)
            result["cases"][name] = run_case(name, base)
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {path} ({len(CASES)} cases, fedtune from {result['fedtune']})")


def _diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {a!r} != {b!r}")


def compare(a: Path, b: Path) -> int:
    ca, cb = json.loads(a.read_text())["cases"], json.loads(b.read_text())["cases"]
    diffs: list[str] = []
    _diff(ca, cb, "cases", diffs)
    for d in diffs[:200]:
        print(d)
    print(f"{len(diffs)} difference(s) over {len(ca)} cases" if diffs else f"identical: {len(ca)} cases")
    return 1 if diffs else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--work", type=Path, help="keep the run directories here")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args()
    if args.cmd == "record":
        record(args.out, args.work)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
