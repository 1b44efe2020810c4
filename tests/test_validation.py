"""Update validation (per-method specs, generic validator), the engine dropping invalid updates and surviving a
failing aggregate, robust aggregation against a scaled / sign-flipped client, and OS noise at the server."""

from __future__ import annotations

import logging

import pytest
import torch

from fedtune import config
from fedtune.algorithms import ClientUpdate, GlobalState, get_algorithm
from fedtune.algorithms.api import (
    TensorSpec,
    UpdateRejected,
    UpdateSpec,
    validate_update,
)
from fedtune.algorithms.common.lora import lora_update_spec
from fedtune.algorithms.fedkseed import FedKSeedConfig
from fedtune.algorithms.flora import FLoRAConfig
from fedtune.algorithms.flora.shared import round_key
from fedtune.algorithms.wrappers.client_dp import ClientLevelDP
from fedtune.algorithms.wrappers.robust import RobustAggregation, RobustConfig
from fedtune.config import ConfigError
from fedtune.run.assemble import build_algorithm
from fedtune.run.engine import EngineConfig, EngineHooks, RoundAborted, RoundEngine
from fedtune.run.metrics import MetricsWriter
from fedtune.transports.base import RoundResult

# -- the generic validator ---------------------------------------------------------------------------------


def _lora(rank=4, d_in=64, d_out=64, n=10, cid="c", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return ClientUpdate(cid, n, {"m.A": torch.randn(rank, d_in, generator=g).to(dtype),
                                 "m.B": torch.randn(d_out, rank, generator=g).to(dtype)})


SPEC = lora_update_spec({"m": (64, 64)}, 4)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda u: u.tensors.pop("m.B"), "update from 'c': 1 expected tensor(s) missing, e.g. 'm.B'"),
    (lambda u: u.tensors.update({"evil": torch.zeros(1)}), "update from 'c': 1 unexpected tensor(s), e.g. 'evil'"),
    (lambda u: u.tensors.update({"m.A": torch.zeros(4, 63)}), "m.A has shape (4, 63), expected (4, 64)"),
    (lambda u: u.tensors.update({"m.A": torch.zeros(20_000, 64)}), "m.A has shape (20000, 64), expected (4, 64)"),
    (lambda u: u.tensors.update({"m.B": u.tensors["m.B"].double()}), "m.B has dtype torch.float64, expected torch.float32"),
    (lambda u: u.tensors["m.A"].fill_(float("nan")), "m.A has 256 non-finite value(s) (NaN/inf)"),
    (lambda u: u.tensors["m.B"].__setitem__((0, 0), float("inf")), "m.B has 1 non-finite value(s)"),
    (lambda u: setattr(u, "num_examples", 0), "num_examples must be a positive integer, got 0"),
    (lambda u: setattr(u, "num_examples", 2**62), f"num_examples = {2**62} exceeds the allowed 48"),
    # client-reported metrics: the server prints train loss and ε/δ from them
    (lambda u: u.metrics.update(train_loss=-1e9), "metric train_loss = -1000000000.0 is outside [0, 10000]"),
    (lambda u: u.metrics.update(epsilon=float("nan")), "metric epsilon = nan is outside [0, inf]"),
    (lambda u: u.metrics.update(delta=2.0), "metric delta = 2.0 is outside [0, 1]"),
    (lambda u: u.metrics.update(zo_clipped_frac=-0.5), "metric zo_clipped_frac = -0.5 is outside [0, 1]"),
    (lambda u: u.metrics.update({f"m{i}": 0.0 for i in range(40)}), "45 metrics, at most 32 allowed"),
    (lambda u: u.metrics.update({"x" * 65: 1.0}), "is not an identifier of at most 64 characters"),
    (lambda u: u.metrics.update({"bad name\n": 1.0}), "metric name 'bad name\\n' is not an identifier"),
    (lambda u: u.metrics.update(train_loss="1.0"), "metric train_loss is a str, not a number"),
])
def test_validator_names_the_problem(mutate, message):
    u = _lora()
    u.metrics = {"train_loss": 2.5, "epsilon": 3.0, "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.1}
    ranges = get_algorithm("fedkseed").metrics_accepted()  # the common ranges and a method's own (zo_*)
    validate_update(SPEC, u, max_examples=48, metric_ranges=ranges)  # the honest update passes
    mutate(u)
    with pytest.raises(UpdateRejected) as e:
        validate_update(SPEC, u, max_examples=48, metric_ranges=ranges)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bounds_and_method_check():
    spec = UpdateSpec({"i": TensorSpec((3,), torch.int32, (0, 9))},
                      check=lambda u: (_ for _ in ()).throw(UpdateRejected("custom says no")))
    with pytest.raises(UpdateRejected, match=r"i has values in \[0, 10\], allowed \[0, 9\]"):
        validate_update(spec, ClientUpdate("c", 1, {"i": torch.tensor([0, 5, 10], dtype=torch.int32)}))
    with pytest.raises(UpdateRejected, match="custom says no"):
        validate_update(spec, ClientUpdate("c", 1, {"i": torch.tensor([0, 5, 9], dtype=torch.int32)}))


# -- per-method specs ----------------------------------------------------------------------------------------


def test_flora_expects_the_assigned_rank_per_client(tiny):
    algo = get_algorithm("flora", FLoRAConfig(rank=4, alpha=8, ranks=[4, 2], target_modules=["q_proj"]))
    state = algo.initialize(tiny, seed=0)
    roster = ["a", "b"]
    confs = algo.configure_round(1, state, roster, {"steps": 1}, roster)
    specs = {c: algo.expected_update(state, confs[c]) for c in roster}
    mods = sorted(state.meta["modules"])
    d_out, d_in = state.meta["modules"][mods[0]]
    a, b = specs["a"].tensors[f"{mods[0]}.A"], specs["b"].tensors[f"{mods[0]}.B"]
    assert (a.shape, a.dtype, b.shape, b.dtype) == ((4, d_in), torch.float32, (d_out, 2), torch.float32)
    assert len(specs["a"].tensors) == 2 * len(mods)
    # client b sends rank 4 where 2 was assigned
    up = ClientUpdate("b", 3, {k: torch.zeros(v.shape) for k, v in specs["a"].tensors.items()})
    with pytest.raises(UpdateRejected, match=rf"{mods[0]}.A has shape \(4, {d_in}\), expected \(2, {d_in}\)"):
        validate_update(specs["b"], up)


def test_fedsb_and_fedavg_specs_follow_the_global_state():
    fedsb = get_algorithm("fedsb")
    state = GlobalState(0, {"m.A": torch.zeros(4, 8), "m.B": torch.zeros(8, 4), "n.A": torch.zeros(4, 8),
                            "n.B": torch.zeros(8, 4), "R": torch.zeros(2, 4, 4)})
    spec = fedsb.expected_update(state, {})
    (name, r), = spec.tensors.items()  # packed r×r per module; A, B never uploaded
    assert (name, r.shape, r.dtype, r.radius) == ("R", (2, 4, 4), torch.float32, float("inf"))  # no steps/lr: no bound
    bounded = fedsb.expected_update(state, {"steps": 4, "lr": 1e-3}).tensors["R"]
    assert bounded.near is state.tensors["R"] and bounded.radius == pytest.approx(4 * 1e-3 * 8)
    validate_update(spec, ClientUpdate("c", 1, {"R": torch.ones(2, 4, 4)}))
    for bad, match in [(torch.zeros(3, 4, 4), r"R has shape \(3, 4, 4\), expected \(2, 4, 4\)"),  # wrong n
                       (torch.zeros(2, 3, 3), r"R has shape \(2, 3, 3\), expected \(2, 4, 4\)"),  # wrong r
                       (torch.zeros(8, 4), r"R has shape \(8, 4\), expected \(2, 4, 4\)"),  # per-module, flattened
                       (torch.zeros(2, 4, 4, dtype=torch.float64), "R has dtype torch.float64, expected torch.float32"),
                       (torch.zeros(2, 4, 4).index_fill_(0, torch.tensor([1]), float("nan")),
                        r"R has 16 non-finite value\(s\) \(NaN/inf\)")]:
        with pytest.raises(UpdateRejected, match=match):
            validate_update(spec, ClientUpdate("c", 1, {"R": bad}))
    with pytest.raises(UpdateRejected, match="2 expected tensor|1 expected tensor"):  # the old per-module layout
        validate_update(spec, ClientUpdate("c", 1, {"m.R": torch.zeros(4, 4), "n.R": torch.zeros(4, 4)}))
    fedavg = get_algorithm("fedavg")
    spec = fedavg.expected_update(GlobalState(0, {"m.A": torch.zeros(2, 8), "m.B": torch.zeros(8, 2)}), {})
    assert set(spec.tensors) == {"m.A", "m.B"} and spec.tensors["m.B"].shape == (8, 2)


def test_fedkseed_expects_tau_pairs_with_indices_in_range():
    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=16))
    spec = algo.expected_update(GlobalState(), {"steps": 3, "grad_clip": 100.0})
    ok = ClientUpdate("c", 5, {"seed_idx": torch.tensor([0, 7, 15], dtype=torch.int32),
                               "grad": torch.tensor([0.5, -2.0, 99.0])})
    validate_update(spec, ok)
    bad_idx = ClientUpdate("c", 5, dict(ok.tensors, seed_idx=torch.tensor([0, 16, 3], dtype=torch.int32)))
    with pytest.raises(UpdateRejected, match=r"seed_idx has values in \[0, 16\], allowed \[0, 15\]"):
        validate_update(spec, bad_idx)
    with pytest.raises(UpdateRejected, match=r"grad has shape \(4,\), expected \(3,\)"):
        validate_update(spec, ClientUpdate("c", 5, dict(ok.tensors, grad=torch.zeros(4))))
    with pytest.raises(UpdateRejected, match=r"grad has values in \[-1e\+06, 99\], allowed \[-100, 100\]"):
        validate_update(spec, ClientUpdate("c", 5, dict(ok.tensors, grad=torch.tensor([0.0, -1e6, 99.0]))))
    # with client-side DP noise the gradient is unbounded (but still finite)
    validate_update(algo.expected_update(GlobalState(), {"steps": 3, "grad_clip": 100.0, "dp_noise_multiplier": 1.0}),
                    ClientUpdate("c", 5, dict(ok.tensors, grad=torch.tensor([0.0, -1e6, 99.0]))))


def test_wrappers_delegate_the_spec():
    state = GlobalState(0, {"m.A": torch.zeros(2, 8), "m.B": torch.zeros(8, 2)})
    inner = get_algorithm("fedavg")
    dp = ClientLevelDP(inner, {"mode": "client", "noise_multiplier": 1.0}, clients_per_round=2, num_clients=2)
    robust = RobustAggregation(dp, RobustConfig(norm_bound=1.0))
    train = {"steps": 2, "lr": 1e-3}
    got, want = robust.expected_update(state, train).tensors, inner.expected_update(state, train).tensors
    assert {k: (t.shape, t.dtype, t.bounds, t.radius) for k, t in got.items()} == \
        {k: (t.shape, t.dtype, t.bounds, t.radius) for k, t in want.items()}


# -- the engine ----------------------------------------------------------------------------------------------


class FixedTransport:
    """Returns the same updates every round (a stand-in for any transport)."""

    def __init__(self, updates):
        self.updates, self.calls = updates, 0

    def run_round(self, plan, timeout_s):
        self.calls += 1
        return RoundResult(updates=[ClientUpdate(u.client_id, u.num_examples, dict(u.tensors)) for u in self.updates])


def _engine(tmp_path, transport, *, algo=None, min_clients=1, retries=1, cap=0, weight_cap=0.0):
    """An engine over `transport`; `weight_cap`: [federation] max_client_weight (off here unless a test is about it,
    so hand-computed weighted means stay n_k / Σ n)."""
    algo = algo or get_algorithm("fedavg")
    cfg = EngineConfig(rounds=1, seed=0, min_clients=min_clients, max_round_retries=retries,
                       max_examples_per_client=cap, max_client_weight=weight_cap)
    return RoundEngine(algo=algo, transport=transport, roster=["a", "b", "c"], cfg=cfg, out_dir=tmp_path)


STATE = GlobalState(0, {"m.A": torch.zeros(2, 8), "m.B": torch.zeros(8, 2)})


def _fedavg_update(cid, n, value):
    return ClientUpdate(cid, n, {"m.A": torch.full((2, 8), value), "m.B": torch.full((8, 2), value)})


def test_engine_drops_invalid_updates_for_every_transport(tmp_path):
    nan = _fedavg_update("b", 5, float("nan"))
    wrong = ClientUpdate("c", 5, {"m.A": torch.zeros(2, 7), "m.B": torch.zeros(8, 2)})
    huge = _fedavg_update("c", 2**62, 9.0)
    engine = _engine(tmp_path, FixedTransport([_fedavg_update("a", 5, 1.0), nan, wrong, huge]), cap=1000)
    writer = MetricsWriter(tmp_path)
    new = engine.run_round(1, STATE, writer)
    assert torch.equal(new.tensors["m.A"], torch.ones(2, 8))  # the mean of a alone
    row = writer.rows[-1]
    assert row["clients_completed"] == 1 and row["updates_rejected"] == 3
    writer.close()


def test_round_train_loss_is_the_weighted_median_of_the_reported_losses(tmp_path):
    """Clients that report no train loss (or NaN: a FedKSeed client whose DP batches were all empty) are left
    out instead of counting as 0; the round's loss is the example-weighted median, so a client's claim cannot drag
    it past the others'; a value outside the range any language model's loss can take is refused with its update."""
    ups = [_fedavg_update("a", 1, 1.0), _fedavg_update("b", 3, 3.0), _fedavg_update("c", 5, 5.0)]
    ups[0].metrics, ups[1].metrics, ups[2].metrics = {"train_loss": 2.0}, {"train_loss": 4.0}, {}
    transport = FixedTransport(ups)
    transport.run_round = lambda plan, t: RoundResult(updates=ups)
    engine, writer = _engine(tmp_path, transport, weight_cap=0.5), MetricsWriter(tmp_path)
    state = engine.run_round(1, STATE, writer)
    assert writer.rows[-1]["train_loss"] == 4.0  # weights 1 and 3: the median is b's
    ups[2].metrics = {"train_loss": float("nan")}
    state = engine.run_round(2, state, writer)
    assert writer.rows[-1]["train_loss"] == 4.0 and writer.rows[-1]["updates_rejected"] == 0
    ups[2].metrics = {"train_loss": 9000.0}  # in range, but one client among three: the median holds
    state = engine.run_round(3, state, writer)
    assert writer.rows[-1]["train_loss"] == 4.0 and writer.rows[-1]["clients_weight_capped"] == ["c"]
    for lie in (-1e30, 1e30):
        ups[2].metrics = {"train_loss": lie}
        state = engine.run_round(4, state, writer)
        # c refused: a and b are left, b's 3 of 4 examples capped to a's 1 (max_client_weight 0.5): the lower median
        assert writer.rows[-1]["train_loss"] == 2.0 and writer.rows[-1]["updates_rejected"] == 1
        assert "train_loss" in writer.rows[-1]["rejected_why"]["c"] and writer.rows[-1]["clients_weight_capped"] == ["b"]
    writer.close()


def test_too_few_valid_updates_abort_the_round(tmp_path):
    engine = _engine(tmp_path, FixedTransport([_fedavg_update("a", 5, float("nan"))]), retries=1)
    writer = MetricsWriter(tmp_path)
    with pytest.raises(RoundAborted, match="too few valid updates or aggregation failed"):
        engine.run_round(1, STATE, writer)
    assert engine.transport.calls == 2 and not list(tmp_path.glob("checkpoints/round-*")) and writer.rows == []
    writer.close()


class FailingFedAvg(type(get_algorithm("fedavg"))):
    """FedAvg whose aggregate raises for the first `fail` calls (or writes NaN when nan=True)."""

    def __init__(self, fail, nan=False):
        super().__init__(get_algorithm("fedavg").config)
        self.fail, self.nan, self.calls = fail, nan, 0

    def aggregate(self, rnd, state, updates):
        self.calls += 1
        if self.calls <= self.fail:
            if self.nan:
                new, m = super().aggregate(rnd, state, updates)
                new.tensors["m.A"][0, 0] = float("nan")
                return new, m
            raise KeyError("m.B")
        return super().aggregate(rnd, state, updates)


@pytest.mark.parametrize("nan", [False, True])
def test_aggregate_failure_aborts_the_round_not_the_process(tmp_path, caplog, nan):
    ups = [_fedavg_update("a", 1, 1.0), _fedavg_update("b", 3, 3.0)]
    # fails once: the attempt is aborted (nothing written), the retry aggregates
    engine = _engine(tmp_path / "once", FixedTransport(ups), algo=FailingFedAvg(1, nan), retries=1)
    writer = MetricsWriter(tmp_path / "once")
    with caplog.at_level(logging.ERROR, logger="fedtune"):
        new = engine.run_round(1, STATE, writer)
    assert "round 1 aborted: aggregation failed" in caplog.text
    assert engine.transport.calls == 2 and len(writer.rows) == 1
    assert torch.equal(new.tensors["m.A"], torch.full((2, 8), 2.5))  # (1·1 + 3·3) / 4
    assert [p.name for p in (tmp_path / "once/checkpoints").glob("round-*")] == ["round-0001"]
    writer.close()
    # fails every attempt: RoundAborted (as for too few clients), no checkpoint, no row
    engine = _engine(tmp_path / "always", FixedTransport(ups), algo=FailingFedAvg(99, nan), retries=2)
    writer = MetricsWriter(tmp_path / "always")
    with pytest.raises(RoundAborted):
        engine.run_round(1, STATE, writer)
    assert engine.algo.calls == 3 and writer.rows == [] and not list(tmp_path.glob("always/checkpoints/round-*"))
    writer.close()


# -- robust aggregation --------------------------------------------------------------------------------------

K_HONEST = 4


def _honest(scale_noise=0.05):
    """4 honest FedAvg updates around a common delta d (‖d‖ = 4) from a zero global; equal num_examples."""
    g = torch.Generator().manual_seed(1)
    d = {"m.A": torch.ones(2, 4), "m.B": torch.ones(4, 2)}
    return d, [ClientUpdate(f"h{i}", 10, {k: v + scale_noise * torch.randn(v.shape, generator=g) for k, v in d.items()})
               for i in range(K_HONEST)]


def _dist(x, y):
    return float(sum(((x.tensors[k].double() - y.tensors[k].double()) ** 2).sum() for k in x.tensors) ** 0.5)


def _norm(tensors):
    return float(sum((t.double() ** 2).sum() for t in tensors.values()) ** 0.5)


@pytest.mark.parametrize("attack", ["scaled_x100", "sign_flip"])
def test_robust_aggregates_stay_near_the_honest_aggregate(attack):
    state = GlobalState(0, {"m.A": torch.zeros(2, 4), "m.B": torch.zeros(4, 2)})
    d, honest = _honest()
    base = honest[0].tensors
    evil = {k: (100 * v if attack == "scaled_x100" else -v) for k, v in base.items()}
    ups = [*honest, ClientUpdate("evil", 10, evil)]
    fedavg = get_algorithm("fedavg")
    H, _ = fedavg.aggregate(1, state, honest)  # honest-only aggregate
    plain, _ = fedavg.aggregate(1, state, ups)
    stack = {k: torch.stack([u.tensors[k] for u in honest]) for k in base}
    honest_range = float(sum(((s.max(0).values - s.min(0).values).double() ** 2).sum() for s in stack.values()) ** 0.5)
    # trimmed mean (β = 0.2 → 1 of 5 trimmed at each end) and median lie inside the honest values per coordinate
    for agg in ({"aggregator": "trimmed_mean", "trim_fraction": 0.2}, {"aggregator": "median"}):
        new, m = RobustAggregation(fedavg, agg).aggregate(1, state, ups)
        assert _dist(new, H) <= honest_range, agg
        assert m["robust_clipped"] == m["robust_rejected"] == 0
    assert _dist(plain, H) > honest_range  # plain FedAvg does not
    # norm bound: clip to 2 × median ‖Δ‖ → ‖agg − H‖ = ‖clip(Δ_evil) − H‖ / 5 ≤ (b + ‖H‖) / 5
    new, m = RobustAggregation(fedavg, {"norm_bound_median_mult": 2.0}).aggregate(1, state, ups)
    b = m["robust_bound"]
    assert m["robust_clipped"] == (1 if attack == "scaled_x100" else 0)
    assert _dist(new, H) <= (b + _norm(H.tensors)) / 5 + 1e-9
    # reject above an absolute bound: exactly the honest-only aggregate when the attacker is above it
    new, m = RobustAggregation(fedavg, {"norm_bound": 10.0, "norm_action": "reject"}).aggregate(1, state, ups)
    if attack == "scaled_x100":
        assert m["robust_rejected"] == 1 and _dist(new, H) == 0.0
    if attack == "scaled_x100":
        assert _dist(plain, H) > 15 * _norm(d) / 5 * 0.9  # ≈ 99·‖Δ‖/5: the attacker moves plain FedAvg ~20 ‖d‖
    else:
        assert _dist(plain, H) > 0.3 * _norm(d)  # ≈ 2‖d‖/5


def test_robust_flora_bounds_each_clients_product():
    algo = get_algorithm("flora", FLoRAConfig(rank=2, alpha=4))
    # modules wide enough that the round's stack (rank 6) is kept beside the cumulative ΔW (FLoRA keeps a stack
    # only while it is no bigger than the cumulative form)
    state = GlobalState(0, {}, {"modules": {"m": [40, 30]}})
    g = torch.Generator().manual_seed(0)
    ups = [ClientUpdate(c, 1, {"m.A": torch.randn(2, 30, generator=g), "m.B": torch.randn(40, 2, generator=g) * s})
           for c, s in (("a", 1.0), ("b", 1.0), ("c", 100.0))]
    robust = RobustAggregation(algo, {"norm_bound_median_mult": 1.5})
    norms = [float(torch.linalg.matrix_norm(u.tensors["m.B"] @ u.tensors["m.A"])) for u in ups]
    assert [robust.update_norm(state, u) for u in ups] == pytest.approx(norms, rel=1e-6)
    new, m = robust.aggregate(1, state, ups)
    assert m["robust_clipped"] == 1 and m["robust_bound"] == pytest.approx(1.5 * sorted(norms)[1], rel=1e-6)
    b_evil = new.tensors[round_key(1, "m.B")][:, 4:]  # client c's columns of the stack
    a_evil = new.tensors[round_key(1, "m.A")][4:] * 3  # rows were scaled by p_c = 1/3
    assert float(torch.linalg.matrix_norm(b_evil @ a_evil)) == pytest.approx(m["robust_bound"], rel=1e-5)
    with pytest.raises(ValueError, match="not available for flora: FLoRA stacks"):
        RobustAggregation(algo, {"aggregator": "trimmed_mean"})


def test_robust_config_and_dp_interaction(tmp_path):
    with pytest.raises(ConfigError, match=r"\[robust\]: unknown \[robust\] keys \['norm'\]"):
        config.from_dict({"robust": {"norm": 1.0}}).robust_config()
    with pytest.raises(ValueError, match="set norm_bound .* OR norm_bound_median_mult"):
        RobustConfig(norm_bound=1.0, norm_bound_median_mult=2.0)
    with pytest.raises(ValueError, match="norm_action must be one of"):
        RobustConfig(norm_action="drop")
    assert not RobustConfig().enabled
    cfg = config.load(None, {"run.algorithm": "fedavg", "robust.aggregator": "median", "privacy.mode": "client",
                             "privacy.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="with client-level DP takes only an absolute norm_bound"):
        build_algorithm(cfg)
    cfg = config.load(None, {"run.algorithm": "fedavg", "robust.norm_bound": 0.5, "privacy.mode": "client",
                             "privacy.noise_multiplier": 1.0})
    algo, budget = build_algorithm(cfg)
    assert isinstance(algo, RobustAggregation) and isinstance(algo.inner, ClientLevelDP) and budget is not None
    with pytest.raises(ConfigError, match="does not apply to 'fedkseed'"):
        build_algorithm(config.load(None, {"run.algorithm": "fedkseed", "robust.norm_bound": 1.0}))


# -- client-level DP noise at the server ---------------------------------------------------------------------


def _dp_round(cfg, deployment):
    algo, _ = build_algorithm(cfg, deployment=deployment)
    state = GlobalState(0, {"m.A": torch.zeros(2, 8), "m.B": torch.zeros(8, 2)}, {"dp_seed": cfg.run.seed})
    new, _ = algo.aggregate(1, state, [_fedavg_update("a", 1, 0.1), _fedavg_update("b", 1, 0.2)])
    return new.tensors["m.A"]


def test_server_noise_comes_from_the_os_unless_noise_seed_is_set(caplog):
    over = {"run.algorithm": "fedavg", "run.seed": 3, "privacy.mode": "client", "privacy.noise_multiplier": 1.0}
    cfg = config.load(None, over)
    assert not torch.equal(_dp_round(cfg, True), _dp_round(cfg, True))  # same seed, two server runs: different noise
    assert torch.equal(_dp_round(cfg, False), _dp_round(cfg, False))  # simulations stay reproducible
    assert build_algorithm(cfg, deployment=True)[0].os_noise
    seeded = config.load(None, dict(over, **{"privacy.noise_seed": 11}))
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        algo, _ = build_algorithm(seeded, deployment=True)
    assert not algo.os_noise and "noise_seed is set: the server's DP noise is reproducible" in caplog.text


def test_robust_in_a_simulated_run(tmp_path):
    """[robust] is wired through build_algorithm into the engine: clip at 1 × the round's median norm clips
    exactly the client(s) above the median (1 of 3), then the coordinate-wise median aggregates; metrics rows
    carry robust_clipped / robust_rejected."""
    import json

    from fedtune.run.assemble import simulate

    cfg = config.load(None, {"model.name": "tiny", "run.algorithm": "fedavg", "run.rounds": 1, "run.out": str(tmp_path),
                             "federation.num_clients": 3, "train.local_steps": 2, "data.max_train_per_client": 16,
                             "data.max_seq_len": 48, "train.lr": 1e-3, "robust.norm_bound_median_mult": 1.0, "robust.aggregator": "median"})
    summary = simulate(cfg, progress=False)
    row = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["algorithm"] == "fedavg+robust"
    assert (row["robust_clipped"], row["robust_rejected"], row["updates_rejected"]) == (1.0, 0.0, 0)
    assert row["robust_bound"] > 0


def test_an_aggregate_with_a_non_finite_loss_is_never_committed(tmp_path):
    """Well-formed updates whose aggregate evaluates to a non-finite loss (here: whenever c's values are in it): the
    engine leaves c out, names it with the reason, and commits the others' aggregate; when leaving one out does not
    help, nothing is written."""
    ups = [_fedavg_update("a", 4, 1.0), _fedavg_update("b", 4, 2.0), _fedavg_update("c", 4, 60.0)]
    engine = _engine(tmp_path, FixedTransport(ups))
    engine.cfg.max_norm_ratio = 0  # this test is about the loss check alone
    engine.hooks = EngineHooks(evaluate=lambda s: float("inf") if float(s.tensors["m.A"].max()) > 10 else 1.0)
    writer = MetricsWriter(tmp_path)
    new = engine.run_round(1, STATE, writer)
    assert torch.equal(new.tensors["m.A"], torch.full((2, 8), 1.5))  # (4·1 + 4·2) / 8
    row = writer.rows[-1]
    assert row["clients_completed"] == 2 and row["updates_rejected"] == 1 and row["eval_loss"] == 1.0
    assert "non-finite loss" in row["rejected_why"]["c"]
    engine.hooks = EngineHooks(evaluate=lambda s: float("nan"))  # nothing helps
    with pytest.raises(RoundAborted):
        engine.run_round(2, new, writer)
    assert [p.name for p in tmp_path.glob("checkpoints/round-*")] == ["round-0001"]
    writer.close()
