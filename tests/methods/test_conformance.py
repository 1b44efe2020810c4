"""What every registered method must do, checked over fedtune.algorithms.available() and, for runs, over the CPU
holdings (float32, bfloat16, nf4) the method declares it trains on. A new method gets all of it without editing a
test: it is found by the registry, and everything here asks only its declarations (Capabilities, expected_update,
quick_settings) and the protocol.

  aggregate          a tensor-averaging method's new state is the example-weighted mean of the update tensors; an
                     exact method's weight change is Σ p_k (the change each update alone makes)
  wire / Flower      an instruction and a real update survive both encodings bit for bit
  hostile updates    the checks every transport runs refuse a missing, extra, reshaped, retyped, non-finite or
                     out-of-bounds tensor and a zero example count; an honest update passes
  a tiny run         learns (test loss falls), resumes bit-identically, and its export loads without fedtune (a peft
                     adapter on the base, or the merged model) and gives the run's own test loss
  sample-level DP    a run under DP reports a growing ε and resumes bit-identically (methods that declare it)
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fedtune import config
from fedtune.algorithms import available, get_algorithm, method
from fedtune.algorithms.api import (
    HOLDINGS,
    ClientUpdate,
    GlobalState,
    Instruction,
    UpdateRejected,
    UpdateSpec,
    validate_update,
)
from fedtune.algorithms.runner import Node
from fedtune.data.prepare import prepare_data
from fedtune.models import load_model
from fedtune.run.assemble import simulate
from fedtune.training.evaluate import evaluate
from fedtune.transports import wire
from fedtune.transports.flower import records

CPU_HOLDINGS = {"float32": {}, "bfloat16": {"model.dtype": "bfloat16"},
                "nf4": {"model.dtype": "bfloat16", "model.quantization": "nf4"}}
ROSTER = ["client-0", "client-1", "client-2"]


def _algo(name: str):
    """The method with its quick settings (as a run config would build it)."""
    cls = method(name)
    return get_algorithm(name, cls.config_class(**cls.quick_settings()))


def _run_cases() -> list:
    cases = []
    for name in available():
        held = _algo(name).capabilities.holdings
        cases += [pytest.param(name, h, id=f"{name}-{h}") for h in CPU_HOLDINGS if h in held]
    return cases


def _tiny():
    model, tok = load_model("tiny", seed=0)
    return model, tok


# -- the aggregate ---------------------------------------------------------------------------------------------


def _random_update(cid: str, n: int, spec: UpdateSpec, g: torch.Generator) -> ClientUpdate:
    """A valid update of `spec`: floats small and random, integers uniform in their bounds."""
    tensors = {}
    for k, t in sorted(spec.tensors.items()):
        if t.dtype.is_floating_point:
            x = torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.05
            if t.bounds is not None:
                x = x.clamp(t.bounds[0] / 2, t.bounds[1] / 2)
            if math.isfinite(t.radius):  # within what local training can move a value (from the global, or 0)
                x = x.clamp(-t.radius / 2, t.radius / 2) + (t.near.double() if t.near is not None else 0.0)
            tensors[k] = x.to(t.dtype)
        else:
            lo, hi = t.bounds if t.bounds is not None else (0, 100)
            tensors[k] = torch.randint(int(lo), int(hi) + 1, t.shape, generator=g).to(t.dtype)
    return ClientUpdate(cid, n, tensors, {"train_loss": 1.0})


def _start(name: str):
    algo = _algo(name)
    model, tok = _tiny()
    if algo.capabilities.data_init:  # reads data: a few examples of the corpus, as prepare_run gives it
        cfg = config.load(None, {"model.name": "tiny", "federation.num_clients": 3})
        algo.set_init_data(prepare_data(cfg, tok).clients["client-0"].train[:16], tok.pad_token_id)
    state = algo.initialize(model, seed=0)
    return algo, state


def _updates(algo, state: GlobalState, n_examples: list[int], seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    cids = ROSTER[:len(n_examples)]
    train = algo.configure_round(1, state, cids, {"steps": 4, "batch_size": 4, "lr": 1e-3}, ROSTER)
    return [_random_update(c, n, algo.expected_update(state, train[c]), g) for c, n in zip(cids, n_examples)]


def _effect(algo, state: GlobalState) -> dict[str, torch.Tensor]:
    """The global model at `state` as what it adds to the base: the adapter's B·A per module when the method exports
    an adapter (none yet: nothing), else every weight of the merged model (float64)."""
    node = Node.for_server(_tiny()[0], algo, state)
    if algo.capabilities.export == "adapter":
        factors = node.client.export_factors(node.model) or {}
        return {m: b.double() @ a.double() for m, (a, b) in factors.items()}
    return {n: p.detach().double().clone() for n, p in node.model.named_parameters()}


@pytest.mark.parametrize("name", available())
def test_aggregate_is_the_declared_math(name):
    algo, state = _start(name)
    caps = algo.capabilities
    assert caps.tensor_average or caps.exact, f"{name} declares neither a tensor average nor an exact aggregate"
    ups = _updates(algo, state, [3, 5])
    p = [0.5, 0.5] if getattr(algo.config, "uniform", False) else [3 / 8, 5 / 8]
    new, _ = algo.aggregate(1, state, ups)
    assert new.version == state.version + 1
    if caps.tensor_average:  # the update tensors replace the state's by their example-weighted mean
        for k in ups[0].tensors:
            want = p[0] * ups[0].tensors[k].double() + p[1] * ups[1].tensors[k].double()
            assert torch.allclose(new.tensors[k].double(), want, atol=1e-7), k
    if caps.exact:  # the weight change is linear in the clients' own changes
        alone = [_effect(algo, algo.aggregate(1, state, [dataclasses.replace(u, num_examples=1)])[0]) for u in ups]
        both = _effect(algo, new)
        e0 = _effect(algo, state)
        e0 = {k: e0.get(k, torch.zeros_like(t)) for k, t in both.items()}  # no adapter yet: it adds nothing
        assert both.keys() == alone[0].keys() == alone[1].keys()
        for k in e0:
            want = e0[k] + p[0] * (alone[0][k] - e0[k]) + p[1] * (alone[1][k] - e0[k])
            # up to rounding: relative to the change, and a few float32 ulps of weights held in float32
            tol = 1e-4 * float((both[k] - e0[k]).abs().max()) + 4 * torch.finfo(torch.float32).eps * float(
                e0[k].abs().max())
            assert float((both[k] - want).abs().max()) <= tol + 1e-12, k
        assert any(not torch.equal(both[k], e0[k]) for k in e0), "the aggregate changed nothing"


# -- what travels ---------------------------------------------------------------------------------------------


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", available())
def test_instruction_and_a_real_update_cross_the_wire_and_flower_bit_for_bit(name, tmp_path):
    algo, state = _start(name)
    cid = ROSTER[0]
    train = dict(algo.configure_round(1, state, [cid], {"steps": 1, "batch_size": 2, "lr": 1e-3}, ROSTER)[cid],
                 seed=7)
    ins = Instruction(1, cid, state.version, train, algo.sync_payload(state, -1), algo.setup_payload(state))
    got = wire.read_task(wire.instruction_to_wire(ins, "t" * 32), max_bytes=1 << 30).instruction
    back, from_version = records.record_to_instruction(records.instruction_to_record(ins, from_version=-1,
                                                                                      client_index=0))
    for other in (got, back):
        assert (other.round, other.client_id, other.base_version, other.train) == (1, cid, 0, train)
        assert _equal(other.sync.tensors, ins.sync.tensors) and other.sync.meta == ins.sync.meta
        assert _equal(other.setup.tensors, ins.setup.tensors) and other.setup.meta == ins.setup.meta
    assert from_version == -1
    model, tok = _tiny()
    node = Node(model)
    node.apply(got, client_id=cid)
    cfg = config.load(None, {"model.name": "tiny", "federation.num_clients": 3})
    update = node.train(prepare_data(cfg, tok).clients[cid].train[:8], tok.pad_token_id, got.train, client_id=cid)
    validate_update(algo.expected_update(state, train), update, metric_ranges=algo.metrics_accepted())
    _, up = wire.read_update(wire.update_to_wire(update, "t" * 32), max_bytes=1 << 30)
    fl = records.record_to_update(records.update_to_record(update))
    for other in (up, fl):
        assert (other.client_id, other.num_examples) == (cid, update.num_examples)
        assert _equal(other.tensors, update.tensors) and other.metrics == update.metrics


@pytest.mark.parametrize("name", available())
def test_hostile_updates_are_refused(name):
    algo, state = _start(name)
    cid = ROSTER[0]
    train = algo.configure_round(1, state, [cid], {"steps": 4, "batch_size": 4, "lr": 1e-3}, ROSTER)[cid]
    spec = algo.expected_update(state, train)
    honest = _updates(algo, state, [5])[0]
    validate_update(spec, honest, metric_ranges=algo.metrics_accepted())  # passes
    first = min(spec.tensors)
    floats = [k for k in sorted(spec.tensors) if spec.tensors[k].dtype.is_floating_point]

    def mutated(**tensors):
        return ClientUpdate(cid, 5, {**honest.tensors, **tensors}, dict(honest.metrics))

    hostile = {
        "missing": ClientUpdate(cid, 5, {k: v for k, v in honest.tensors.items() if k != first}, {}),
        "extra": mutated(evil=torch.zeros(1)),
        "reshaped": mutated(**{first: torch.zeros((honest.tensors[first].shape[0] + 1,
                                                    *honest.tensors[first].shape[1:]), dtype=spec.tensors[first].dtype)}),
        "retyped": mutated(**{first: honest.tensors[first].to(torch.float64 if spec.tensors[first].dtype != torch.float64
                                                                else torch.float32)}),
        "no examples": dataclasses.replace(honest, num_examples=0),
        "negative loss": dataclasses.replace(honest, metrics={"train_loss": -1.0}),
    }
    if floats:
        nan = honest.tensors[floats[0]].clone()
        nan.view(-1)[0] = float("nan")
        hostile["NaN"] = mutated(**{floats[0]: nan})
    for k, t in sorted(spec.tensors.items()):
        if t.bounds is not None:
            out = honest.tensors[k].clone()
            out.view(-1)[0] = t.bounds[1] + 1
            hostile[f"{k} out of bounds"] = mutated(**{k: out})
    radius = [k for k in floats if math.isfinite(spec.tensors[k].radius)]
    if algo.capabilities.update_norm:  # first-order methods bound every value by what AdamW can do (adam_radius)
        assert radius, f"{name} declares no magnitude bound on its update"
    for k in radius[:2]:  # finite but huge, and an honest update scaled ×1000 (issue: one update lost the whole run)
        near = spec.tensors[k].near.double() if spec.tensors[k].near is not None else 0.0
        for what, big in (("1e19", 1e19), ("3e38", 3e38)):
            out = honest.tensors[k].clone()
            out.view(-1)[0] = big
            hostile[f"{k} entry {what}"] = mutated(**{k: out})
        scaled = (near + 1000 * (honest.tensors[k].double() - near) + spec.tensors[k].radius).to(honest.tensors[k].dtype)
        hostile[f"{k} ×1000"] = mutated(**{k: scaled})
    for what, u in hostile.items():
        with pytest.raises(UpdateRejected):
            validate_update(spec, u, max_examples=1000, metric_ranges=algo.metrics_accepted())
            pytest.fail(f"{name}: a {what} update passed")


# -- a tiny run ---------------------------------------------------------------------------------------------------


def _cfg(tmp_path, name: str, holding: str, rounds: int, *, out: str, **extra):
    over = {"run.algorithm": name, "model.name": "tiny", "federation.num_clients": 3, "run.rounds": rounds,
            "run.threads": 1, "run.seed": 1, "train.local_steps": 4, "train.batch_size": 4,
            "data.max_test_examples": 48, "data.max_eval_per_client": 8, "run.out": str(tmp_path / out),
            **{f"{name}.{k}": v for k, v in method(name).quick_settings().items()}, **CPU_HOLDINGS[holding], **extra}
    return config.load(None, over)


def _tensor_files(run_dir) -> dict[str, dict]:
    return {str(f.relative_to(run_dir)): load_file(str(f)) for f in sorted(run_dir.rglob("*.safetensors"))
            if "checkpoints" not in f.parts}


def _export_test_loss(summary: dict, cfg) -> float:
    """The run's test loss recomputed from its export alone, loaded without fedtune's method code: plain peft on
    the base (held as the run held it), or the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tok = load_model("tiny", seed=cfg.run.seed, dtype=cfg.model.dtype, quantization=cfg.model.quantization)
    if summary["adapter"]:
        model = PeftModel.from_pretrained(base, summary["adapter"]).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(summary["merged"]).eval()
    test = prepare_data(cfg, tok).test
    return evaluate(model, test, pad_id=tok.pad_token_id, batch_size=cfg.run.eval_batch_size)


@pytest.mark.parametrize(("name", "holding"), _run_cases())
def test_a_tiny_run_learns_resumes_bit_identically_and_exports(name, holding, tmp_path):
    full = simulate(_cfg(tmp_path, name, holding, 2, out="full"), progress=False)
    assert full["rounds_completed"] == 2
    assert full["test_loss_final"] < full["test_loss_first"], "the run did not learn"
    simulate(_cfg(tmp_path, name, holding, 1, out="part"), progress=False)
    resumed = simulate(_cfg(tmp_path, name, holding, 2, out="part"), resume=True, progress=False)
    assert resumed["global_model_fingerprint"] == full["global_model_fingerprint"]
    a, b = _tensor_files(tmp_path / "full"), _tensor_files(tmp_path / "part")
    assert a.keys() == b.keys() and a and all(_equal(a[f], b[f]) for f in a)
    exported = _export_test_loss(full, _cfg(tmp_path, name, holding, 2, out="full"))
    tol = 1e-5 if holding == "float32" else 2e-2  # another code path on a bf16 / 4-bit base: bf16 rounding
    assert abs(exported - full["test_loss_final"]) <= tol * abs(full["test_loss_final"])
    assert (full["adapter"] is not None) == (_algo(name).capabilities.export == "adapter")


@pytest.mark.parametrize("name", [n for n in available() if _algo(n).capabilities.sample_dp])
def test_a_run_under_sample_level_dp_reports_growing_epsilon_and_resumes(name, tmp_path):
    dp = {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, "privacy.noise_seed": 5}
    full = simulate(_cfg(tmp_path, name, "float32", 2, out="full", **dp), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rows if r["round"] > 0]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] and math.isfinite(eps[1]) and full["epsilon"] == eps[1]
    simulate(_cfg(tmp_path, name, "float32", 1, out="part", **dp), progress=False)
    resumed = simulate(_cfg(tmp_path, name, "float32", 2, out="part", **dp), resume=True, progress=False)
    assert resumed["global_model_fingerprint"] == full["global_model_fingerprint"]
    assert resumed["epsilon"] == full["epsilon"]


def test_holdings_are_the_ones_fedtune_knows():
    for name in available():
        assert set(_algo(name).capabilities.holdings) <= set(HOLDINGS), name
