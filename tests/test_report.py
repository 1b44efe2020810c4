"""simulations/report.py in quick mode on the tiny model: the whole matrix → JSON, REPORT.md and PNGs (CI keeps it
from rotting; the SmolLM2 matrix stays out of CI)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_report_quick_mode(tmp_path):
    sys.path.insert(0, str(ROOT / "simulations"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "simulations"))
    res = tmp_path / "res"
    assert report.main(["--model", "tiny", "--quick", "--runs", str(tmp_path / "runs"), "--results", str(res)]) == 0
    doc = json.loads((res / "matrix.json").read_text())
    names = {r["name"] for r in doc["runs"]}
    assert names == set(report.matrix(quick=True))  # every entry ran and was collected
    assert set(doc["defaults"]) == {"fedavg", "flora", "fedsb", "fedkseed"}
    for r in doc["runs"]:
        assert r["test_loss_base"] == doc["base_test_loss"]  # one test set, one base, for every entry
        assert len(r["test_loss_by_round"]) == 3  # round 0 + 2 rounds
    by = {r["name"]: r for r in doc["runs"]}
    assert by["local"]["bytes_total"] == by["central"]["bytes_total"] == by["central-seq"]["bytes_total"] == 0
    assert by["fedsb@0.01"]["bytes_up_per_client_round"] < by["fedavg@0.003"]["bytes_up_per_client_round"]
    assert 0 < by["fedavg-dp1"]["epsilon_spent"] <= 1.0 + 1e-6
    # phase 2 trains at the sweep's picks: DP at its method's, the baselines at FedAvg-LoRA's
    assert by["fedavg-dp1"]["lr"] == doc["defaults"]["fedavg"]["lr"] == by["local"]["lr"] == by["central"]["lr"]
    assert by["fedsb-dp1"]["lr"] == doc["defaults"]["fedsb"]["lr"]
    md = (res / "REPORT.md").read_text()
    for word in ("FedAvg-LoRA", "FLoRA", "Fed-SB", "FedKSeed", "local-only", "centralized (same steps)",
                 "centralized (sequential)", "Findings", "ε=1"):
        assert word in md, word
    for png in ("test_loss_vs_round.png", "test_loss_vs_bytes.png", "per_client.png"):
        assert (res / png).stat().st_size > 1000 and f"]({png})" in md
    assert len(doc["prompts"]) == 5 and all("base" in p["answers"] for p in doc["prompts"])
    # task metrics next to the losses: the base and every scored model on the same 8 test examples
    bt = doc["base_tasks"]
    assert bt["examples"] == 8 and 0 <= bt["rouge_l"] <= 1 and bt["exact_match"] * 8 == round(bt["exact_match"] * 8)
    mc = [json.loads(x) for x in (res / "mc_task" / "mc.jsonl").read_text().splitlines()]
    assert len(mc) == 8 and all(len(q["choices"]) == 4 and 0 <= q["answer"] < 4 for q in mc)
    assert bt["mc_acc"] * 8 == round(bt["mc_acc"] * 8)  # k of the 8 questions
    for name in ("fedavg@0.003", "fedsb@0.01", "fedavg-dp1", "central"):
        assert 0 <= by[name]["rouge_l"] <= 1 and 0 <= by[name]["mc_acc"] <= 1, name
    assert "rouge_l" not in by["local"]  # per-client models: not scored
    assert "| Rouge-L | exact match | MC acc |" in md


def test_report_jobs_run_each_entry_in_its_own_process(tmp_path):
    """--jobs 2: entries run as child processes, phase 2 after phase 1 with its pick; each writes its peak RSS."""
    import os
    import subprocess

    runs = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "simulations" / "report.py"), "--model", "tiny", "--quick", "--jobs", "2",
           "--runs", str(runs), "--only", "fedavg@0.003", "--only", "fedavg-dp1", "--only", "local"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done ") == 3 and "FAILED" not in r.stdout
    for d in ("fedavg-lr0.003", "fedavg-dp1", "local"):
        assert float((runs / d / "peak_rss_mb.txt").read_text()) > 50  # a process of its own, torch loaded
    dp = json.loads((runs / "fedavg-dp1" / "summary.json").read_text())
    assert dp["config"]["algorithms"]["fedavg"]["lr"] == 0.003  # the pick of the (one-value) finished sweep
