"""FedProx: μ = 0 is FedAvg bit for bit; μ > 0 pulls each client's update toward the global adapter (a smaller update
on a non-IID split, smaller as μ grows); the proximal gradient is exactly μ (w − w_g), in the one-client loop, under
sample-level DP and in the batched loop. (The conformance suite runs FedProx like every method.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune import config
from fedtune.algorithms import TrainContext, get_algorithm
from fedtune.algorithms.fedprox import FedProxConfig, proximal
from fedtune.data.prepare import prepare_data
from fedtune.models import load_model
from fedtune.run.assemble import simulate


def _run(tmp_path, name: str, **over) -> dict:
    cfg = config.load(None, {"model.name": "tiny", "federation.num_clients": 3, "run.rounds": 2, "run.seed": 3,
                             "train.local_steps": 3, "train.batch_size": 4, "run.threads": 1,
                             "run.out": str(tmp_path / name), **over})
    return simulate(cfg, progress=False)


def test_mu_zero_is_fedavg_bit_for_bit(tmp_path):
    avg = _run(tmp_path, "avg", **{"run.algorithm": "fedavg"})
    prox = _run(tmp_path, "prox", **{"run.algorithm": "fedprox", "fedprox.mu": 0.0})
    a = load_file(str(tmp_path / "avg/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "prox/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert prox["global_model_fingerprint"] == avg["global_model_fingerprint"]
    rows = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("avg", "prox")]
    for r_avg, r_prox in zip(*rows, strict=True):
        for k in ("train_loss", "eval_loss", "test_loss", "fedavg_gap"):
            assert r_avg.get(k) == r_prox.get(k), k


def _clients(mu: float, **train):
    """Round 1 of FedProx(μ) on the tiny model: (algo, state, node model, client, by-category shards)."""
    model, tok = load_model("tiny", seed=0)
    algo = get_algorithm("fedprox", FedProxConfig(rank=4, alpha=8, mu=mu))
    state = algo.initialize(model, seed=0)
    client = algo.make_client()
    model = client.setup(model, algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    cfg = config.load(None, {"model.name": "tiny", "federation.num_clients": 3, "data.partition": "by_category"})
    shards = prepare_data(cfg, tok).clients
    roster = list(shards)
    confs = algo.configure_round(1, state, roster, {"steps": 8, "batch_size": 4, "lr": 2e-2, **train}, roster)
    ctxs = [TrainContext(c, shards[c].train, tok.pad_token_id) for c in roster]
    return state, client, model, ctxs, [dict(confs[c], seed=i) for i, c in enumerate(roster)]


def _norm(update, state) -> float:
    return float(sum(((update.tensors[k].double() - state.tensors[k].double()) ** 2).sum() for k in update.tensors)
                 ** 0.5)


def test_a_larger_mu_gives_smaller_updates_on_a_non_iid_split():
    norms = {}
    for mu in (0.0, 1.0, 10.0):
        state, client, model, ctxs, cfgs = _clients(mu)
        assert all(c["mu"] == mu for c in cfgs)
        norms[mu] = [_norm(client.train(model, ctx, cfg), state) for ctx, cfg in zip(ctxs, cfgs)]
    for k in range(3):  # every client of the by-category split, each on its own categories
        assert norms[0.0][k] > norms[1.0][k] > norms[10.0][k] > 0, norms


def test_the_hook_adds_exactly_mu_times_the_distance_to_the_global_weights():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    step = proximal(0.5)([p])  # w_g = the weights as training starts
    with torch.no_grad():
        p.add_(torch.tensor([0.25, 0.0, -1.0]))
    p.grad = torch.tensor([0.1, 0.2, 0.3])
    step()
    assert torch.equal(p.grad, torch.tensor([0.1, 0.2, 0.3]) + 0.5 * torch.tensor([0.25, 0.0, -1.0]))


def test_under_sample_level_dp_the_term_applies_and_mu_zero_is_the_dp_fedavg_step():
    dp = {"mode": "sample", "noise_multiplier": 1.0, "noise_seed": 11, "max_grad_norm": 1.0}
    out = {}
    for mu in (0.0, 10.0):
        state, client, model, ctxs, cfgs = _clients(mu)
        out[mu] = client.train(model, ctxs[0], dict(cfgs[0], privacy=dp))
        assert out[mu].metrics["epsilon"] > 0
    state, client, model, ctxs, cfgs = _clients(0.0)
    avg_client = get_algorithm("fedavg").make_client()
    avg_model = avg_client.setup(load_model("tiny", seed=0)[0], get_algorithm("fedprox", FedProxConfig(
        rank=4, alpha=8)).setup_payload(state))
    avg_client.sync(avg_model, get_algorithm("fedprox").sync_payload(state, -1))
    cfg = {k: v for k, v in cfgs[0].items() if k != "mu"}
    avg = avg_client.train(avg_model, ctxs[0], dict(cfg, privacy=dp))
    assert all(torch.equal(avg.tensors[k], out[0.0].tensors[k]) for k in avg.tensors)  # same noise, same step
    assert _norm(out[10.0], state) < _norm(out[0.0], state)  # the same noise, pulled toward w_g


@pytest.mark.parametrize("mu", [0.0, 5.0])
def test_batched_clients_equal_one_by_one_with_the_term(mu):
    _state, client, model, ctxs, cfgs = _clients(mu, max_grad_norm=0.05)
    seq = [client.train(model, c, g) for c, g in zip(ctxs, cfgs)]
    bat = client.train_many(model, ctxs, cfgs)
    assert bat is not None
    for a, b in zip(seq, bat):
        assert max(float((a.tensors[k] - b.tensors[k]).abs().max()) for k in a.tensors) <= 1e-4
