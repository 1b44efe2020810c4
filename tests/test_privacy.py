"""Privacy: accountant sanity values, DP-SGD mechanics on tiny Llama + peft LoRA, DP-FedAvg, budget."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from fedtune.algorithms import ClientUpdate, GlobalState, get_algorithm
from fedtune.algorithms.common.lora import (
    activate,
    attach_lora,
    get_lora_state,
    lora_layers,
    set_lora_state,
)
from fedtune.algorithms.wrappers.client_dp import ClientLevelDP, clip_update
from fedtune.data import ChatFormatter, collate, load_chatterbot
from fedtune.models import load_model
from fedtune.privacy import (
    Accountant,
    PrivacyConfig,
    SampleLevelDP,
    dp_training,
    noise_for_target,
    per_example_loss,
    private_train_local,
)
from fedtune.training.loop import LocalTrainConfig, train_local

DELTA = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


# ---------------------------------------------------------------- accountant
@pytest.mark.parametrize("mech,sigma,q,steps,eps,tol", [
    ("rdp", 1.0, 0.01, 1000, 2.1014, 1e-3), ("prv", 1.0, 0.01, 1000, 1.8384, 1e-3),
    ("rdp", 1.5, 0.04, 2250, 7.3291, 1e-3), ("prv", 1.5, 0.04, 2250, 6.78, 1e-2),
])
def test_accountant_sanity_values(mech, sigma, q, steps, eps, tol):
    acc = Accountant(mech)
    acc.step(sigma, q, steps)
    assert acc.epsilon(DELTA) == pytest.approx(eps, abs=tol)


def test_accountant_monotone_copy_and_state_roundtrip():
    acc = Accountant("rdp")
    assert acc.epsilon(DELTA) == 0.0
    eps = []
    for _ in range(4):
        acc.step(1.0, 0.05, 50)
        eps.append(acc.epsilon(DELTA))
    assert all(a < b for a, b in itertools.pairwise(eps))
    assert acc.history == [(1.0, 0.05, 200)]  # merged like opacus' own step()
    after = acc.epsilon_after(DELTA, 1.0, 0.05, 50)
    assert acc.steps == 200 and after > eps[-1]  # computed on a copy
    assert acc.would_exceed(after - 1e-6, DELTA, 1.0, 0.05, 50) and not acc.would_exceed(after + 1e-6, DELTA, 1.0, 0.05, 50)
    restored = Accountant.from_state(json.loads(json.dumps(acc.state_dict())))
    assert restored.epsilon(DELTA) == eps[-1]
    sigma = noise_for_target(2.0, DELTA, 0.01, 1000)
    one = Accountant("rdp")
    one.step(sigma, 0.01, 1000)
    assert 1.98 <= one.epsilon(DELTA) <= 2.0


def test_privacy_config_validation():
    assert not PrivacyConfig().enabled
    with pytest.raises(ValueError, match="needs noise_multiplier"):
        PrivacyConfig(mode="sample")
    both = PrivacyConfig(mode="client", noise_multiplier=1.0, target_epsilon=3.0)  # fixed σ + a budget
    assert both.noise_multiplier == 1.0 and both.target_epsilon == 3.0
    with pytest.raises(ValueError, match="mode"):
        PrivacyConfig(mode="user")
    with pytest.raises(ValueError, match="max_grad_norm"):
        PrivacyConfig(mode="sample", noise_multiplier=1.0, max_grad_norm=0)
    with pytest.raises(ValueError, match="delta"):
        PrivacyConfig(mode="client", noise_multiplier=1.0, delta=2.0)
    with pytest.raises(ValueError, match="unknown"):
        PrivacyConfig.from_dict({"mode": "sample", "sigma": 1.0})
    pc = PrivacyConfig(mode="sample", target_epsilon=8.0)
    assert pc.sample_delta(50) == 1e-5 and pc.sample_delta(10**6) == 1e-6
    assert pc.client_delta(10) == 1e-5 and PrivacyConfig.from_dict(json.loads(json.dumps(pc.to_dict()))) == pc


# ---------------------------------------------------------------- sample-level DP
@pytest.fixture(scope="module")
def lora_model():
    model, tok = load_model("tiny")
    feats = ChatFormatter(tok, max_seq_len=32).many(load_chatterbot()[:60])
    model = attach_lora(model, adapter="default", rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
    activate(model, "default")
    g = torch.Generator().manual_seed(1)  # non-zero B so that A has gradients too
    st = get_lora_state(model, "default")
    set_lora_state(model, "default", {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in st.items()})
    return model, tok.pad_token_id or 0, feats


def _grads(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _no_opacus_traces(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
        assert not hasattr(m, "activations") and not hasattr(m, "autograd_grad_sample_hooks")
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad") and p.grad is None


def test_per_example_grads_clipping_and_sum(lora_model):
    model, pad, feats = lora_model
    ex, C, E = feats[:3], 0.05, 4
    model.train()
    ref = []  # per-example gradients by plain autograd, one example at a time
    for f in ex:
        model.zero_grad(set_to_none=True)
        per_example_loss(model, collate([f], pad)).sum().backward()
        ref.append({n: p.grad.clone() for n, p in _grads(model).items()})
    model.zero_grad(set_to_none=True)
    before = get_lora_state(model, "default")
    with dp_training(model, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=E, lr=0.0) as (gsm, opt):
        per_example_loss(gsm, collate(ex, pad)).sum().backward()
        named = _grads(model)
        assert all(not hasattr(p, "grad_sample") for p in model.parameters() if not p.requires_grad)
        for n, p in named.items():
            assert p.grad_sample.shape == (3, *p.shape)
            for i in range(3):
                torch.testing.assert_close(p.grad_sample[i], ref[i][n], atol=1e-5, rtol=1e-3)
        norms = torch.stack([p.grad_sample.reshape(3, -1).norm(dim=1) for p in named.values()], 1).norm(dim=1)
        assert (norms > C).all()  # clipping is active for this test
        factor = (C / (norms + 1e-6)).clamp(max=1.0)
        clipped_norms = torch.stack([(p.grad_sample * factor.view(-1, *[1] * p.dim())).reshape(3, -1).norm(dim=1)
                                     for p in named.values()], 1).norm(dim=1)
        assert (clipped_norms <= C + 1e-3).all()
        expected = {n: torch.einsum("i,i...->...", factor, p.grad_sample) / E for n, p in named.items()}
        opt.step()
        for n, p in named.items():
            torch.testing.assert_close(p.grad, expected[n], atol=1e-7, rtol=1e-4)
    assert get_lora_state(model, "default").keys() == before.keys()  # lr = 0: nothing moved
    _no_opacus_traces(model)


def test_noise_std_on_zero_gradient(lora_model):
    model, pad, feats = lora_model
    sigma, C, E = 2.0, 0.5, 4
    model.train()
    g = torch.Generator().manual_seed(0)
    with dp_training(model, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=E, lr=0.0,
                     generator=g) as (gsm, opt):
        (per_example_loss(gsm, collate(feats[:2], pad)).sum() * 0.0).backward()
        opt.step()
        noise = torch.cat([p.grad.flatten() for p in opt.params])
    assert noise.numel() > 1000
    assert abs(noise.mean().item()) < 0.05 * sigma * C / E
    assert noise.std().item() == pytest.approx(sigma * C / E, rel=0.15)
    _no_opacus_traces(model)


def test_dp_round_changes_lora_keeps_base_and_leaves_a_normal_model(lora_model):
    model, pad, feats = lora_model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora0 = get_lora_state(model, "default")
    dp = SampleLevelDP()
    cfg = LocalTrainConfig(steps=3, batch_size=4, lr=1e-2, seed=3)
    priv = PrivacyConfig(mode="sample", noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=7).to_dict()
    res, m = dp.train(model, "c1", feats, cfg, priv, pad_id=pad)
    assert res.steps == 3 and math.isfinite(res.loss)
    assert m["delta"] == min(1 / len(feats), 1e-5) and m["sample_rate"] == pytest.approx(4 / len(feats))
    ref = Accountant("rdp")
    ref.step(1.0, 4 / len(feats), 3)
    assert m["epsilon"] == pytest.approx(ref.epsilon(m["delta"]))
    lora1 = get_lora_state(model, "default")
    assert any(not torch.equal(lora0[k], lora1[k]) for k in lora0)
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    assert not model.training
    _no_opacus_traces(model)
    # the accountant persists per client across rounds, and checkpoints as JSON
    _, m2 = dp.train(model, "c1", feats, cfg, priv, pad_id=pad)
    assert m2["epsilon"] > m["epsilon"]
    restored = SampleLevelDP()
    restored.load_state_dict(json.loads(json.dumps(dp.state_dict())))
    assert restored.accountants["c1"].epsilon(m["delta"]) == pytest.approx(m2["epsilon"])
    # the same model now trains normally without DP
    lora2 = get_lora_state(model, "default")
    train_local(model, feats, LocalTrainConfig(steps=2, batch_size=4, lr=1e-2), pad_id=pad)
    lora3 = get_lora_state(model, "default")
    assert any(not torch.equal(lora2[k], lora3[k]) for k in lora2)
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert len(lora_layers(model, "default")) == 4


# ---------------------------------------------------------------- client-level DP
def _state_and_updates():
    g = torch.Generator().manual_seed(0)
    glob = {"m.A": torch.randn(2, 3, generator=g), "m.B": torch.randn(3, 2, generator=g)}
    deltas = [{k: torch.randn(v.shape, generator=g) * s for k, v in glob.items()} for s in (0.1, 1.0, 3.0)]
    ups = [ClientUpdate(f"c{i}", 10 * (i + 1), {k: glob[k] + d[k] for k in glob}) for i, d in enumerate(deltas)]
    state = GlobalState(version=4, tensors=glob, meta={"dp_seed": 5})
    return state, ups, deltas


def _dp(sigma=0.0, C=1.0, **kw):
    return ClientLevelDP(get_algorithm("fedavg"), PrivacyConfig(mode="client", noise_multiplier=sigma, clip_norm=C),
                         clients_per_round=3, num_clients=10, **kw)


def test_clip_update_norm():
    _, _, deltas = _state_and_updates()
    for d in deltas:
        clipped, norm = clip_update(d, 1.0)
        new = torch.sqrt(sum((t**2).sum() for t in clipped.values()))
        assert new <= 1.0 + 1e-6 and (norm <= 1.0) == all(torch.equal(clipped[k], d[k]) for k in d)


def test_client_dp_without_noise_is_mean_of_clipped_updates():
    state, ups, deltas = _state_and_updates()
    new, metrics = _dp(sigma=0.0, C=1.0).aggregate(5, state, ups)
    hand = {}
    for k in state.tensors:
        acc = torch.zeros_like(state.tensors[k])
        for d in deltas:
            n = math.sqrt(sum(float((t**2).sum()) for t in d.values()))
            acc += d[k] * min(1.0, 1.0 / n)
        hand[k] = state.tensors[k] + acc / 3
    for k, v in hand.items():
        torch.testing.assert_close(new.tensors[k], v)
    assert new.version == 5 and metrics["epsilon"] == math.inf and metrics["delta"] == 1e-5
    assert state.meta == {"dp_seed": 5}  # pure: the input state is untouched


def test_client_dp_noise_is_seeded_and_scaled():
    state, ups, _ = _state_and_updates()
    dp = _dp(sigma=1.0, C=1.0)
    a, b = dp.aggregate(5, state, ups)[0], dp.aggregate(5, state, ups)[0]
    c = dp.aggregate(6, state, ups)[0]
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)
    clean = _dp(sigma=0.0).aggregate(5, state, ups)[0]
    noise = torch.cat([(a.tensors[k] - clean.tensors[k]).flatten() for k in a.tensors]) * 3
    assert 0.3 < noise.std().item() < 2.0  # N(0, σ²C²) on the sum: 12 coordinates, loose check
    acc = Accountant.from_state(a.meta["accountant"])
    assert acc.history == [(1.0, 0.3, 1)]


def test_client_dp_refuses_flora_and_delegates():
    with pytest.raises(ValueError, match="FLoRA stacks"):
        ClientLevelDP(get_algorithm("flora"), PrivacyConfig(mode="client", noise_multiplier=1.0),
                      clients_per_round=2, num_clients=4)
    with pytest.raises(ValueError, match="rounds"):
        ClientLevelDP(get_algorithm("fedavg"), PrivacyConfig(mode="client", target_epsilon=1.0),
                      clients_per_round=2, num_clients=4)
    dp = _dp()
    assert dp.make_client().__class__.__name__ == "LoRAClient"
    assert dp.setup_payload(GlobalState()).meta["algorithm"] == "fedavg"


def test_budget_stops_at_the_right_round():
    state, ups, _ = _state_and_updates()
    state.meta["accountant"] = Accountant("rdp").state_dict()
    dp = ClientLevelDP(get_algorithm("fedavg"), PrivacyConfig(mode="client", target_epsilon=3.0, clip_norm=1.0),
                       clients_per_round=3, num_clients=10, rounds=5)
    ref, expected = Accountant("rdp"), None
    for r in range(1, 100):
        ref.step(dp.noise_multiplier, 0.3)
        if ref.epsilon(dp.delta) > 3.0:
            expected = r
            break
    assert expected is not None and expected > 5  # σ was calibrated for 5 rounds
    stopped = None
    for r in range(1, 100):
        if dp.would_exceed_budget(state):
            stopped = r
            break
        state, metrics = dp.aggregate(r, state, ups)
        assert metrics["epsilon"] <= 3.0
    assert stopped == expected
    assert dp.epsilon(state) == pytest.approx(metrics["epsilon"])


def test_dp_training_on_fedsb_style_r_between_frozen_factors():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 3, bias=False), torch.nn.Linear(3, 3, bias=False),
                              torch.nn.Linear(3, 6, bias=False))
    net[0].weight.requires_grad_(False)
    net[2].weight.requires_grad_(False)
    frozen = [net[0].weight.clone(), net[2].weight.clone()]
    x = torch.randn(5, 4, 6)
    ref = []
    for i in range(5):
        net.zero_grad(set_to_none=True)
        (net(x[i : i + 1]) ** 2).mean().backward()
        ref.append(net[1].weight.grad.clone())
    net.zero_grad(set_to_none=True)
    with dp_training(net, noise_multiplier=0.5, max_grad_norm=10.0, expected_batch_size=5, lr=0.1) as (gsm, opt):
        ((gsm(x) ** 2).mean(dim=(1, 2))).sum().backward()
        torch.testing.assert_close(net[1].weight.grad_sample, torch.stack(ref))
        assert not hasattr(net[0].weight, "grad_sample")
        r0 = net[1].weight.clone()
        opt.step()
    assert not torch.equal(net[1].weight, r0)
    assert torch.equal(net[0].weight, frozen[0]) and torch.equal(net[2].weight, frozen[1])
    _no_opacus_traces(net)


def test_empty_poisson_batches_are_noise_only_steps(lora_model):
    model, pad, feats = lora_model
    lora0 = get_lora_state(model, "default")
    step_losses: list[float] = []
    res = private_train_local(model, feats[:5], LocalTrainConfig(steps=8, batch_size=1, lr=1e-2), noise_multiplier=1.0,
                              max_grad_norm=1.0, pad_id=pad, generator=torch.Generator().manual_seed(0),
                              on_step=lambda s, loss: step_losses.append(loss))
    assert res.steps == 8 and len(step_losses) == 8
    assert any(math.isnan(x) for x in step_losses)  # q = 1/5: P(empty) = 0.8^5 per step
    lora1 = get_lora_state(model, "default")
    assert any(not torch.equal(lora0[k], lora1[k]) for k in lora0)
    _no_opacus_traces(model)


def test_runs_without_dp_do_not_import_opacus():
    """opacus (+ scipy) costs ~1.5 s per process start; only DP code paths import it."""
    import subprocess
    import sys

    code = "import sys, fedtune.cli, fedtune.run.assemble, fedtune.transports.grpc.coordinator, fedtune.transports.grpc.agent; " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('opacus', 'scipy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
