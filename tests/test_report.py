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
    assert by["local"]["bytes_total"] == by["central"]["bytes_total"] == 0
    assert by["fedsb@0.003"]["bytes_up_per_client_round"] < by["fedavg@0.001"]["bytes_up_per_client_round"]
    assert 0 < by["fedavg-dp1"]["epsilon_spent"] <= 1.0 + 1e-6
    md = (res / "REPORT.md").read_text()
    for word in ("FedAvg-LoRA", "FLoRA", "Fed-SB", "FedKSeed", "local-only", "centralized", "Findings", "ε=1"):
        assert word in md, word
    for png in ("test_loss_vs_round.png", "test_loss_vs_bytes.png", "per_client.png"):
        assert (res / png).stat().st_size > 1000 and f"]({png})" in md
    assert len(doc["prompts"]) == 5 and all("base" in p["answers"] for p in doc["prompts"])
