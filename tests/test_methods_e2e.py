"""Tiny end-to-end runs of every method and privacy mode through `simulate`, asserting on metrics.jsonl and
summary.json (exact byte counts, ε bookkeeping, budget stop, refusals)."""

from __future__ import annotations

import json

import pytest

from fedtune import config
from fedtune.cli import main
from fedtune.config import ConfigError
from fedtune.run.assemble import simulate

BASE = {"model.name": "tiny", "federation.num_clients": 3, "train.local_steps": 3, "train.lr": 5e-3,
        "data.max_train_per_client": 48, "data.max_seq_len": 64, "run.rounds": 2}
N_MODULES = 4  # tiny Llama: 2 layers × (q_proj, v_proj)


def run(tmp_path, name, extra_toml="", **kw):
    path = None
    if extra_toml:
        path = tmp_path / f"{name}.toml"
        path.write_text(extra_toml)
    cfg = config.load(path, {**BASE, "run.out": str(tmp_path / name), **kw})
    summary = simulate(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def test_fedsb_upload_is_modules_times_r_squared_floats(tmp_path):
    _, rows = run(tmp_path, "sb", "[fedsb]\nrank = 4\n", **{"run.algorithm": "fedsb"})
    for r in rows[1:]:
        assert r["payload_bytes_up"] == 3 * N_MODULES * 4 * 4 * 4  # clients × modules × r² × 4 bytes
        assert r["fedsb_upload_bytes"] == N_MODULES * 16 * 4
    # A and B travel once (setup, round 1); afterwards only R goes down
    assert rows[2]["payload_bytes_down"] == 3 * N_MODULES * 16 * 4 < rows[1]["payload_bytes_down"]


def test_fedkseed_client_round_under_18_kb(tmp_path):
    """K = 4096 seeds, τ = 200 steps: upload τ·(4+4) bytes of payload per client-round; after the one-time
    setup, a round's download is the previous round's (seed, coefficient) pairs, ≤ K·4 bytes here."""
    summary, rows = run(tmp_path, "ks", "[fedkseed]\nnum_seeds = 4096\ntrainable = \"lora\"\nlr = 1e-3\n",
                        **{"run.algorithm": "fedkseed", "train.local_steps": 200, "train.batch_size": 2})
    for r in rows[1:]:
        assert r["payload_bytes_up"] == 3 * 200 * 8
        assert r["fedkseed_bytes_up_per_client"] == 200 * 8
        assert r["bytes_up"] / 3 < 18 * 1024
    assert rows[2]["payload_bytes_down"] / 3 <= 4096 * 4
    assert rows[2]["bytes_down"] / 3 < 18 * 1024
    assert summary["rounds_completed"] == 2


def test_sample_dp_reports_growing_epsilon_and_resumes_it(tmp_path):
    priv = "[privacy]\nmode = \"sample\"\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n"
    full, rows = run(tmp_path, "dp", priv, **{"run.algorithm": "fedavg", "run.rounds": 3})
    eps = [r["epsilon"] for r in rows[1:]]
    assert all(e is not None and e > 0 for e in eps) and eps == sorted(eps) and eps[0] < eps[-1]
    assert all(r["delta"] is not None and 0 < r["delta"] <= 1e-5 for r in rows[1:])
    assert full["epsilon"] == eps[-1]
    # stop after 2 rounds, resume to 3: the accountants come back from the checkpoint
    p = tmp_path / "part.toml"
    p.write_text(priv)
    simulate(config.load(p, {**BASE, "run.out": str(tmp_path / "part"), "run.algorithm": "fedavg"}), progress=False)
    resumed = simulate(config.load(p, {**BASE, "run.out": str(tmp_path / "part"), "run.algorithm": "fedavg",
                                       "run.rounds": 3}), resume=True, progress=False)
    assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-12)


def test_client_dp_budget_stops_early_and_says_so(tmp_path):
    with pytest.raises(ConfigError, match="needs noise_multiplier"):
        run(tmp_path, "bad", "[privacy]\nmode = \"client\"\n", **{"run.algorithm": "fedavg"})
    # fixed σ = 1 with a budget of ε = 5: the run asks for 10 rounds, the budget stops it earlier
    priv = "[privacy]\nmode = \"client\"\nnoise_multiplier = 1.0\ntarget_epsilon = 5.0\nclip_norm = 1.0\n"
    summary, rows = run(tmp_path, "budget", priv, **{"run.algorithm": "fedavg", "run.rounds": 10,
                                                     "federation.fraction": 0.34, "federation.min_clients": 1})
    assert summary["stopped_early"] and "target_epsilon=5.0" in summary["stopped_early"]
    assert 0 < summary["rounds_completed"] < 10
    assert summary["epsilon"] == rows[-1]["epsilon"] <= 5.0
    eps = [r["epsilon"] for r in rows[1:]]
    assert eps == sorted(eps) and eps[0] > 0


def test_flora_with_client_dp_is_refused_with_reason(capsys, tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[privacy]\nmode = \"client\"\nnoise_multiplier = 1.0\n")
    code = main(["simulate", "--config", str(p), "--model", "tiny", "--algorithm", "flora", "--no-progress",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "client-level DP cannot wrap 'flora'" in err and "stacks" in err


def test_fedkseed_sample_dp_reports_epsilon_and_resumes_it(tmp_path):
    """DP zeroth-order: the same per-client ε bookkeeping as DP-SGD (one accountant step per ZO step), the same
    bytes on the wire, and the accountants come back from the checkpoint."""
    priv = "[privacy]\nmode = \"sample\"\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n[fedkseed]\nnum_seeds = 64\n"
    kw = {"run.algorithm": "fedkseed", "train.batch_size": 2, "run.threads": 1}
    full, rows = run(tmp_path, "kdp", priv, **kw, **{"run.rounds": 3})
    eps = [r["epsilon"] for r in rows[1:]]
    assert all(e > 0 for e in eps) and eps == sorted(eps) and eps[0] < eps[-1] and full["epsilon"] == eps[-1]
    assert all(r["payload_bytes_up"] == 3 * 3 * 8 for r in rows[1:])  # clients × τ × (int32 + float32)
    p = tmp_path / "kpart.toml"
    p.write_text(priv)
    simulate(config.load(p, {**BASE, **kw, "run.out": str(tmp_path / "kpart")}), progress=False)
    resumed = simulate(config.load(p, {**BASE, **kw, "run.out": str(tmp_path / "kpart"), "run.rounds": 3}),
                       resume=True, progress=False)
    assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-12)


def test_sample_dp_budget_stops_when_clients_are_spent(tmp_path):
    """Fixed σ with a per-client budget: once fewer than min_clients may train another round, the run ends
    cleanly (a client whose budget is spent sits out; the others go on while min_clients are left)."""
    one_round, _ = run(tmp_path, "probe", "[privacy]\nmode = \"sample\"\nnoise_multiplier = 1.0\n",
                       **{"run.algorithm": "fedavg", "run.rounds": 1})
    budget = one_round["epsilon"] * 1.2  # enough for round 1, not for all 4 (ε grows ~√rounds)
    summary, rows = run(tmp_path, "spent", f"[privacy]\nmode = \"sample\"\nnoise_multiplier = 1.0\n"
                        f"target_epsilon = {budget}\n",
                        **{"run.algorithm": "fedavg", "run.rounds": 4, "federation.min_clients": 3})
    assert 1 <= summary["rounds_completed"] < 4
    assert "privacy budget spent" in summary["stopped_early"]
    assert one_round["epsilon"] <= summary["epsilon"] <= budget
    assert [r["clients_completed"] for r in rows[1:]] == [3] * summary["rounds_completed"]
