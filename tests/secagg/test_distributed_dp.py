"""Distributed DP ([privacy] mode = "distributed"): the Skellam noise each client adds, the accountant against the
paper's formula and the Gaussian limit, the noise the coordinator's unmasked sum carries, dropouts raising ε, the
ring check, budget stop and resume through the round engine, and the refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp

from fedtune import config
from fedtune.algorithms.registry import get_algorithm
from fedtune.algorithms.wrappers.distributed_dp import DistributedDP, plan_noise
from fedtune.config import ConfigError
from fedtune.privacy.accounting import Accountant, noise_for_target
from fedtune.privacy.config import PrivacyConfig
from fedtune.privacy.skellam import (
    ORDERS,
    SkellamAccountant,
    rdp_to_epsilon,
    round_rdp,
    skellam_rdp,
    subsampled_rdp,
)
from fedtune.run import checkpoint
from fedtune.run.assemble import simulate
from fedtune.secagg.encode import EncodingError, Part
from fedtune.secagg.local import run_local
from fedtune.secagg.noise import (
    NoiseParams,
    conditional_round,
    encode_noised,
    l1_bound,
    ring_holds,
    rounded_l2_bound,
    skellam,
    tail,
)
from fedtune.secagg.protocol import ProtocolError, RoundParams

FAST = {"model.name": "tiny", "federation.num_clients": 4, "train.local_steps": 3, "train.lr": 5e-3,
        "data.max_train_per_client": 40, "data.max_seq_len": 48, "run.rounds": 2, "federation.workers": 1,
        "secagg.enabled": True, "privacy.mode": "distributed", "privacy.clip_norm": 0.05}


def _cfg(tmp_path, name, algorithm="fedavg", **kw):
    return config.load(None, {**FAST, "run.algorithm": algorithm, "run.out": str(tmp_path / name), **kw})


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# -- the noise --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mu", [0.7, 40.0, 3e10, 2.0**37])  # 2^37: the sum of several Poisson draws per value
def test_skellam_noise_has_the_variance_the_accountant_assumes(mu):
    """Mean 0 and variance μ: 400k draws, each within 6 standard errors (var of the sample variance ≈ 2μ²/n)."""
    z = skellam(400_000, mu, np.random.default_rng(1)).astype(np.float64)
    n = z.size
    assert abs(z.mean()) < 6 * math.sqrt(mu / n)
    se_var = math.sqrt((2 * mu**2 + mu) / n)  # the excess kurtosis of Sk(μ) is 1/μ: var(s²) ≈ (2μ² + μ)/n
    assert abs(z.var() - mu) < 6 * se_var
    assert z.dtype == np.float64 and np.all(z == np.round(z))


def test_what_one_client_adds_is_its_share_of_the_noise():
    """A client with a zero vector sends exactly its Skellam share: variance μ per coordinate, nothing else."""
    layout = (Part("a", (300, 200), 0.05, weighted=False), Part("b", (40_000,), 0.05, weighted=False))
    noise = NoiseParams(1e5, 1e9, rounded_l2_bound(1e5 * 0.05, 100_000))
    y, _ = encode_noised({"a": np.zeros((300, 200)), "b": np.zeros(40_000)}, layout, noise, 64, np.random.default_rng(2))
    v = y.view(np.int64).astype(np.float64)
    assert abs(v.var() / 1e9 - 1) < 6 * math.sqrt(2 / v.size)


def test_conditional_rounding_is_unbiased_and_keeps_the_bound():
    rng = np.random.default_rng(3)
    x = rng.normal(size=50_000)
    x *= 30.0 / np.linalg.norm(x)  # s·C = 30 with √d = 224: the regime where rounding inflates the norm the most
    bound = rounded_l2_bound(30.0, x.size)
    assert bound < 30.0 + math.sqrt(x.size)  # the probabilistic bound is the tighter one here
    qs = np.stack([conditional_round(x, bound, rng) for _ in range(40)])
    assert all(float(np.dot(q, q)) <= bound**2 for q in qs)
    assert abs((qs.mean(0) - x).mean()) < 0.01  # E q = x (bias averaged over coordinates and draws)
    with pytest.raises(EncodingError, match="conditional rounding"):
        conditional_round(x, 10.0, rng)


def test_tail_bound_and_ring_check():
    """tail(μ, m): P(max |Sk(μ)| > a) ≤ 2^-40; for large μ close to the Gaussian's √(2μ ln(2m·2^40))."""
    mu, m = 1e10, 460_800
    g = math.sqrt(2 * mu * (math.log(2 * m) + 40 * math.log(2)))
    assert g <= tail(mu, m) <= 1.01 * g
    z = skellam(m, mu, np.random.default_rng(4))
    assert np.abs(z).max() < tail(mu, m)
    noise = NoiseParams(1e6, 1e11, rounded_l2_bound(1e6, m))
    assert ring_holds(noise, 1.0, 4, m, 32)  # 4·(1e6 + 1) + 8.8·√(4e11) ≪ 2^31
    assert not ring_holds(noise, 1.0, 4_000, m, 32)  # 4e9 > 2^31


# -- the accountant ---------------------------------------------------------------------------------------------------
def test_skellam_rdp_matches_the_papers_formula_by_hand():
    # α Δ₂²/(2μ) + min(((2α−1)Δ₂² + 6Δ₁)/(4μ²), 3Δ₁/(2μ))
    assert skellam_rdp(2, 3, 5, 10) == pytest.approx(2 * 9 / 20 + (3 * 9 + 30) / 400)  # 0.9 + 0.1425
    assert skellam_rdp(2, 1, 1, 0.5) == pytest.approx(2.0 + 3.0)  # the 3Δ₁/(2μ) branch: min(9, 3)
    # Zhu & Wang's bound by hand at α = 2 and 3, q = 1/2, ε(j) = j/2 (the Gaussian with σ = 1)
    assert subsampled_rdp(2, 0.5, lambda j: j / 2) == pytest.approx(math.log(0.75 + 0.25 * math.e))
    by_hand = math.log(0.25 * 2 + 3 * 0.25 * 0.5 * math.e + 3 * 0.125 * math.e**3) / 2
    assert subsampled_rdp(3, 0.5, lambda j: j / 2) == pytest.approx(by_hand)
    assert subsampled_rdp(3, 1.0, lambda j: j / 2) == 1.5


@pytest.mark.parametrize(("eps", "rounds"), [(1.0, 5), (3.0, 20), (8.0, 100)])
def test_large_variance_skellam_is_the_gaussian_within_one_percent(eps, rounds):
    """Every client every round (q = 1): with Δ₂ large at fixed σ = √μ/Δ₂ the Skellam accountant gives the ε of
    fedtune's Gaussian accountant (opacus RDP) within 1 %; never below it."""
    sigma = noise_for_target(eps, 1e-5, 1.0, rounds)
    l2 = 1e6
    acc = SkellamAccountant()
    acc.step(1.0, l2, l1_bound(l2, 460_800), (sigma * l2) ** 2, rounds)
    gauss = Accountant("rdp")
    gauss.step(sigma, 1.0, rounds)
    e, g = acc.epsilon(1e-5), gauss.epsilon(1e-5)
    assert g <= e * (1 + 1e-9) and e <= 1.01 * g


def test_subsampled_skellam_is_an_upper_bound_of_the_sampled_gaussian():
    """At q < 1 the general amplification bound is looser than opacus' exact sampled-Gaussian analysis, never tighter
    (the same orders)."""
    for q, sigma in [(0.5, 1.0), (0.1, 1.5)]:
        rdp = round_rdp(q, 1e6, 1e6 * 700, (sigma * 1e6) ** 2) * 20
        gauss = compute_rdp(q=q, noise_multiplier=sigma, steps=20, orders=list(ORDERS))
        assert np.all(rdp >= np.asarray(gauss) * (1 - 1e-9))
        e_s, e_g = rdp_to_epsilon(rdp, 1e-5), rdp_to_epsilon(gauss, 1e-5)
        assert e_g <= e_s <= 2.5 * e_g


def test_accountant_state_roundtrip_and_foreign_state():
    acc = SkellamAccountant()
    acc.step(1.0, 10.0, 30.0, 400.0, 2)
    acc.step(1.0, 10.0, 30.0, 400.0)
    acc.step(1.0, 10.0, 30.0, 300.0)
    assert acc.rounds == 4 and len(acc.history) == 2
    back = SkellamAccountant.from_state(json.loads(json.dumps(acc.state_dict())))
    assert back.epsilon(1e-5) == acc.epsilon(1e-5) > 0
    with pytest.raises(ValueError, match="another \\[privacy\\] mode"):
        SkellamAccountant.from_state(Accountant("rdp").state_dict())


# -- the plan and the wrapper ------------------------------------------------------------------------------------------
def test_plan_fits_the_ring_and_keeps_sensitivity_close_to_the_clip():
    for d, bits in [(3_584, 32), (460_800, 32), (460_800, 64)]:
        p = plan_noise(1.0, 0.05, 0.05, d, n_max=4, t_min=3, bits=bits)
        assert p.l2_bound / (p.scale * 0.05) - 1 <= 1e-3
        assert p.mu == pytest.approx(p.l2_bound**2 / 3)  # σ² Δ₂² / t
        assert ring_holds(p, 0.05, 4, d, bits)
    with pytest.raises(EncodingError, match="bits = 64"):
        plan_noise(1.0, 1.0, 1.0, 10**7, n_max=10**6, t_min=10**6, bits=32)


def _state(d_a=(4, 16), d_b=(16, 4)):
    from fedtune.algorithms.api import GlobalState

    t = {"m.lora_A": torch.zeros(d_a), "m.lora_B": torch.zeros(d_b)}
    return GlobalState(version=0, tensors=t, meta={})


def _ddp(**kw):
    pc = PrivacyConfig(mode="distributed", **{"noise_multiplier": 1.0, "clip_norm": 0.05, **kw})
    return DistributedDP(get_algorithm("fedavg"), pc, clients_per_round=4, num_clients=4, rounds=3,
                         min_survivors=3, train={"steps": 1, "lr": 1e-3, "batch_size": 1, "grad_accum": 1,
                                                 "weight_decay": 0.0, "max_grad_norm": 1.0})


def test_fewer_survivors_cost_more_epsilon_and_the_noise_is_not_the_coordinators():
    """apply_secure adds no noise (the decoded sum already holds it): the change is exactly parts / m. A round with
    3 survivors spends more ε than one with 4 (less summed noise)."""
    from fedtune.algorithms.api import ClientUpdate, GlobalState

    dp = _ddp()
    st = _state()
    meta = dict(st.meta)
    meta.update({"accountant": SkellamAccountant().state_dict(), "ddp": dp.make_plan(st)})
    st = GlobalState(version=0, tensors=st.tensors, meta=meta)
    parts = {"m.lora_A": torch.full((4, 16), 0.4, dtype=torch.float64),
             "m.lora_B": torch.full((16, 4), -0.2, dtype=torch.float64)}
    ups = [ClientUpdate(f"c{i}", {}, 10) for i in range(4)]
    new4, m4 = dp.apply_secure(1, st, parts, ups)
    _, m3 = dp.apply_secure(1, st, parts, ups[:3])
    assert torch.equal(new4.tensors["m.lora_A"], torch.full((4, 16), 0.1))
    assert m3["epsilon"] > m4["epsilon"] > 0 and m3["noise_multiplier"] == pytest.approx(1.0, rel=1e-9)
    assert m4["noise_multiplier"] == pytest.approx(math.sqrt(4 / 3), rel=1e-9)
    with pytest.raises(ValueError, match="fewer than the 3"):
        dp.apply_secure(1, st, parts, ups[:2])


@pytest.mark.parametrize(("eps", "shape"), [(2.0, (4, 16)), (1.0, (8, 57_600))])  # 57,600 × 8 × 2: SmolLM2's q,v
def test_target_epsilon_calibration_spends_the_budget_at_the_fewest_survivors(eps, shape):
    dp = _ddp(noise_multiplier=None, target_epsilon=eps)
    plan = dp.make_plan(_state(shape, shape[::-1]))
    acc = SkellamAccountant()
    acc.step(1.0, plan["l2_bound"], plan["l1_bound"], 3 * plan["mu"], 3)
    assert 0.995 * eps <= acc.epsilon(dp.delta) <= eps and plan["bits"] == 32


# -- through the protocol and the engine --------------------------------------------------------------------------------
def test_the_unmasked_sum_differs_from_the_plain_sum_by_noise_of_the_planned_scale():
    """Four clients, the protocol in process: decoded − plain sum has mean ≈ 0 and standard deviation √(4μ)/s (what
    the round reports as ddp_noise_std) within 5 %."""
    d, C = 20_000, 0.05
    noise = plan_noise(1.0, C, C, d, n_max=4, t_min=3, bits=32)
    params = RoundParams(run="r", round=1, attempt=0, bits=32, threshold=2 / 3, degree=0, weights="uniform",
                         max_weight=1, layout=(Part("x", (d,), C, weighted=False),), l2_clip=C, noise=noise)
    rng = np.random.default_rng(5)
    vecs = {}
    for i in range(4):
        v = rng.normal(size=d)
        vecs[f"c{i}"] = {"x": v * (C * 0.9 / np.linalg.norm(v))}
    res, _ = run_local(RoundParams.from_dict(params.to_dict()), vecs, dict.fromkeys(vecs, 1))
    diff = res.parts["x"] - sum(v["x"] for v in vecs.values())
    want = math.sqrt(4 * noise.mu) / noise.scale
    assert res.stats["ddp_noise_std"] == pytest.approx(want)
    assert abs(diff.std() / want - 1) < 0.05 and abs(diff.mean()) < 6 * want / math.sqrt(d)


def test_a_client_refuses_noise_parameters_that_do_not_hold_together():
    good = RoundParams(run="r", round=1, attempt=0, bits=32, threshold=2 / 3, degree=0, weights="uniform",
                       max_weight=1, layout=(Part("x", (100,), 0.05, weighted=False),), l2_clip=0.05,
                       noise=NoiseParams(1e6, 1e9, rounded_l2_bound(1e6 * 0.05, 100)))
    d = good.to_dict()
    assert RoundParams.from_dict(d).noise == good.noise
    for bad, why in [({**d, "noise": {**d["noise"], "l2_bound": 10.0}}, "below what conditional rounding"),
                     ({**d, "noise": {**d["noise"], "mu": -1}}, "positive"),
                     ({**d, "l2_clip": 0.0}, "needs an L2 clip"),
                     ({**d, "weights": "examples"}, "uniform weights")]:
        with pytest.raises(ProtocolError, match=why):
            RoundParams.from_dict(bad)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsb"])
def test_distributed_dp_runs_and_reports_epsilon(tmp_path, algorithm):
    """Two rounds, 4 clients, σ fixed: ε per round equals the Skellam accountant's for the plan with 4 survivors,
    the state carries the plan, and the global change is noised (not equal to a run without noise)."""
    simulate(_cfg(tmp_path, "d", algorithm, **{"privacy.noise_multiplier": 0.8}), progress=False)
    rows = _rows(tmp_path / "d")[1:]
    st = checkpoint.latest(tmp_path / "d" / "checkpoints").state
    plan = st.meta["ddp"]
    assert plan["bits"] == 32 and plan["t_min"] == 3 and plan["sigma"] == 0.8
    acc = SkellamAccountant()
    for r in rows:
        assert r["secagg_clients"] == 4 and r["ddp_bits"] == 32
        acc.step(1.0, plan["l2_bound"], plan["l1_bound"], 4 * plan["mu"])
        assert r["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-12)
        assert r["ddp_noise_std"] == pytest.approx(math.sqrt(4 * plan["mu"]) / plan["scale"])


def test_budget_stop_and_resume(tmp_path, crash_at_checkpoint):
    """σ fixed and a target ε: the run stops cleanly before the round that would exceed it; an interrupted run
    resumed from its checkpoint ends with the same ε and state as one that was not interrupted."""
    per = {"privacy.noise_multiplier": 1.0, "federation.min_clients": 4, "secagg.min_survivors": 4}
    simulate(_cfg(tmp_path, "probe", **per, **{"run.rounds": 1}), progress=False)
    e1 = _rows(tmp_path / "probe")[1]["epsilon"]
    acc = SkellamAccountant.from_state(checkpoint.latest(tmp_path / "probe" / "checkpoints").state.meta["accountant"])
    q, l2, l1, mu, _ = acc.history[0]
    e2, e3 = acc.epsilon_after(1e-5, q, l2, l1, mu), acc.epsilon_after(1e-5, q, l2, l1, mu, 2)
    target = (e2 + e3) / 2  # two rounds fit, a third does not
    over = {**per, "run.rounds": 5, "privacy.target_epsilon": target}
    out = simulate(_cfg(tmp_path, "b", **over), progress=False)
    rows = _rows(tmp_path / "b")[1:]
    assert [r["epsilon"] for r in rows] == pytest.approx([e1, e2]) and out["rounds_completed"] == 2
    undo = crash_at_checkpoint(2)
    with pytest.raises(KeyboardInterrupt):
        simulate(_cfg(tmp_path, "r", **over), progress=False)
    undo()
    simulate(_cfg(tmp_path, "r", **over), resume=True, progress=False)
    a = checkpoint.latest(tmp_path / "r" / "checkpoints").state
    assert a.meta["accountant"]["history"][0][4] == 2 and _rows(tmp_path / "r")[-1]["epsilon"] == pytest.approx(e2)


def test_refusals(tmp_path):
    from fedtune.run.assemble import build_algorithm

    with pytest.raises(ConfigError, match="needs secure aggregation"):
        _cfg(tmp_path, "x", **{"secagg.enabled": False, "privacy.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="noise_seed does not apply"):
        _cfg(tmp_path, "x", **{"privacy.noise_multiplier": 1.0, "privacy.noise_seed": 3})
    with pytest.raises(ConfigError, match="flora"):
        _cfg(tmp_path, "x", "flora", **{"privacy.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="noise_multiplier > 0"):
        build_algorithm(_cfg(tmp_path, "x", **{"privacy.noise_multiplier": 0.0}))


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path):
    simulate(_cfg(tmp_path, "f", **{"privacy.noise_multiplier": 1.0, "run.rounds": 1}), progress=False)
    d = next((tmp_path / "f" / "checkpoints").glob("round-*"))
    meta = json.loads((d / "state.json").read_text())
    assert meta["format"] == checkpoint.FORMAT == 2
    del meta["format"]  # format 1: still read
    (d / "state.json").write_text(json.dumps(meta))
    assert checkpoint.latest(tmp_path / "f" / "checkpoints").round == 1
    meta["format"] = 3
    (d / "state.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointFormatError, match="format 3"):
        checkpoint.latest(tmp_path / "f" / "checkpoints")
