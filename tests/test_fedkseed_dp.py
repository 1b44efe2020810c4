"""Sample-level DP for FedKSeed (DP zeroth-order): per-example clipping of the projected-gradient scalars, the
σ = 0 / C = ∞ step equals the plain step bit-for-bit, noise scale, pinned ε, budget stop, LoRA base untouched,
exact replay of a DP run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import fresh, params_of
from conftest import start_fedkseed as start
from torch import nn

from fedtune.algorithms import TrainContext, get_algorithm
from fedtune.algorithms.fedkseed import FedKSeedClient, FedKSeedConfig
from fedtune.data import collate
from fedtune.privacy import (
    Accountant,
    DPRound,
    PrivacyBudgetExhausted,
    clip_scalars,
    private_scalar_mean,
)
from fedtune.training import zo


def priv(**kw) -> dict:
    return dict({"mode": "sample", "max_grad_norm": 1.0, "noise_multiplier": 1.0}, **kw)


class ConstLM(nn.Module):
    """A 'language model' whose loss does not depend on its (trainable) weight: every g_i is exactly 0."""

    def __init__(self, vocab: int = 5) -> None:
        super().__init__()
        self.vocab, self.w = vocab, nn.Parameter(torch.zeros(3))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + 0.0 * self.w.sum())


CONST_FEATS = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}] * 20


def const_client() -> tuple[FedKSeedClient, ConstLM]:
    client = FedKSeedClient()
    client.seeds = list(range(100, 108))
    return client, ConstLM()


def const_cfg(**privacy) -> dict:
    return {"steps": 5, "lr": 1e-3, "eps": 1e-3, "grad_clip": 100.0, "batch_size": 2, "seed": 0,
            "privacy": priv(**privacy)}


# --- the mechanism on real per-example scalars --------------------------------------------------------------


def test_example_losses_match_the_hf_loss_per_example(ktok, kfeats):
    model = fresh(ktok)
    batch = collate(kfeats[:4], ktok.pad_token_id)
    per = zo.example_losses(model, batch)
    for i in range(4):
        one = collate(kfeats[i : i + 1], ktok.pad_token_id)
        assert per[i].item() == pytest.approx(model(**one).loss.item(), rel=1e-5)


def test_clipped_per_example_scalars_within_c_and_sum_hand_checked(ktok, kfeats):
    algo, state, client, model = start(FedKSeedConfig(num_seeds=8, lr=1e-3), ktok)
    parts = [collate(kfeats[:4], ktok.pad_token_id), collate(kfeats[4:8], ktok.pad_token_id)]
    params = zo.zo_parameters(model)
    g_i, _, _ = zo.spsa_example_grads(model, params, parts, 7, 1e-3)
    assert g_i.shape == (8,) and g_i.dtype == torch.float64
    C = float(g_i.abs().median())  # about half of the scalars get clipped
    c = clip_scalars(g_i, C)
    assert c.abs().max() <= C and (c.abs() == C).sum() >= 3
    keep = g_i.abs() <= C
    assert torch.equal(c[keep], g_i[keep]) and torch.equal(c[~keep], C * g_i[~keep].sign())
    gen = torch.Generator().manual_seed(0)
    assert private_scalar_mean(g_i, clip=C, noise_multiplier=0.0, expected_batch=5, generator=gen) == float(c.sum()) / 5
    # a σ = 0 DP round: every uploaded g is a sum of at most |batch| clipped scalars over E
    up = client.train(model, TrainContext("a", kfeats[:20], ktok.pad_token_id),
                      dict(algo.configure_round(1, state, ["a"], {"steps": 6, "batch_size": 4, "seed": 1}, ["a"])["a"],
                           privacy=priv(noise_multiplier=0.0, max_grad_norm=C)))
    assert up.tensors["grad"].abs().max() <= 20 * C / 4 and up.tensors["grad"].abs().sum() > 0


def test_dp_step_without_noise_or_clipping_is_the_plain_step_bit_for_bit(ktok, kfeats):
    _, _, client, model = start(FedKSeedConfig(num_seeds=8, lr=1e-3), ktok)
    parts = [collate(kfeats[:4], ktok.pad_token_id), collate(kfeats[4:6], ktok.pad_token_id)]
    params = zo.zo_parameters(model)
    theta = [p.detach().clone() for _, p in params]
    plain = client.step(model, params, parts, 11, eps=1e-3, lr=1e-3, grad_clip=100.0, dp=None)
    after_plain = [p.detach().clone() for _, p in params]
    for (_, p), t in zip(params, theta):
        p.data.copy_(t)
    dp = DPRound(noise_multiplier=0.0, clip=math.inf, sample_rate=0.3, expected_batch=6,
                 generator=torch.Generator().manual_seed(0))
    private = client.step(model, params, parts, 11, eps=1e-3, lr=1e-3, grad_clip=100.0, dp=dp)
    assert private == plain and plain[0] != 0.0  # (g, loss, skipped, clamped), compared as exact floats
    assert all(torch.equal(p, a) for (_, p), a in zip(params, after_plain))


# --- noise and accounting (a constant-loss model: g_i = 0, so the upload is the noise alone) ------------------


@pytest.fixture
def one_thread():
    """400 tiny steps: intra-op threads only add contention here."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_noise_std_of_the_step_scalar_on_a_constant_loss_batch(one_thread):
    client, model = const_client()
    sigma, C, E = 1.3, 0.5, 4
    cfg = dict(const_cfg(noise_multiplier=sigma, max_grad_norm=C, noise_seed=3), steps=400, batch_size=E)
    up = client.train(model, TrainContext("a", CONST_FEATS, 0), cfg)
    g = up.tensors["grad"].double()
    assert abs(g.std().item() / (sigma * C / E) - 1) <= 0.15 and abs(g.mean().item()) < 4 * sigma * C / E / 400**0.5
    assert up.metrics["noise_multiplier"] == sigma and up.metrics["sample_rate"] == E / 20


def test_pinned_epsilon_and_accountant_history():
    client, model = const_client()  # n = 20, batch 2: q = 0.1; 2 rounds × 5 steps at σ = 1
    for rnd in range(2):
        up = client.train(model, TrainContext("a", CONST_FEATS, 0), dict(const_cfg(), seed=rnd))
    assert client.dp.accountants["a"].history == [(1.0, 0.1, 10)]
    assert up.metrics["delta"] == 1e-5 and up.metrics["epsilon"] == pytest.approx(3.4413, abs=1e-3)  # opacus RDP
    client2, _ = const_client()
    up = client2.train(model, TrainContext("a", CONST_FEATS, 0), dict(const_cfg(accountant="prv"), steps=10))
    assert up.metrics["epsilon"] == pytest.approx(2.8648, abs=1e-2)  # opacus PRV


def test_target_epsilon_calibrates_sigma_to_the_planned_rounds():
    client, model = const_client()
    cfg = const_cfg(noise_multiplier=None, target_epsilon=2.0, rounds=3)
    for rnd in range(3):
        up = client.train(model, TrainContext("a", CONST_FEATS, 0), dict(cfg, seed=rnd))
    assert 1.9 <= up.metrics["epsilon"] <= 2.0  # opacus' calibration tolerance
    with pytest.raises(PrivacyBudgetExhausted):
        client.train(model, TrainContext("a", CONST_FEATS, 0), dict(cfg, seed=3))


def test_budget_stop_at_the_predicted_round_across_a_restart():
    ref, eps = Accountant("rdp"), []
    for _ in range(8):
        ref.step(1.0, 0.1, 5)
        eps.append(ref.epsilon(1e-5))
    target = (eps[3] + eps[4]) / 2  # rounds 1-4 fit, round 5 would exceed
    cfg = const_cfg(target_epsilon=target)
    client, model = const_client()
    for rnd in range(2):
        client.train(model, TrainContext("a", CONST_FEATS, 0), dict(cfg, seed=rnd))
    restarted, _ = const_client()  # the client process restarts: its accountant comes back from its state
    restarted.load_state_dict(client.state_dict())
    done = 2
    for rnd in range(2, 8):
        try:
            up = restarted.train(model, TrainContext("a", CONST_FEATS, 0), dict(cfg, seed=rnd))
        except PrivacyBudgetExhausted as e:
            assert "target_epsilon" in str(e)
            break
        done += 1
    assert done == 4 and up.metrics["epsilon"] == pytest.approx(eps[3]) and eps[3] <= target


# --- real model: LoRA base untouched, exact replay --------------------------------------------------------------


def test_lora_mode_dp_changes_only_the_adapter(ktok, kfeats):
    algo, state, client, model = start(FedKSeedConfig(num_seeds=16, trainable="lora", rank=2, alpha=4, lr=1e-2), ktok)
    before = params_of(model)
    cfg = algo.configure_round(1, state, ["a"], {"steps": 3, "batch_size": 2, "seed": 0}, ["a"])["a"]
    up = client.train(model, TrainContext("a", kfeats[:20], ktok.pad_token_id), dict(cfg, privacy=priv()))
    assert up.metrics["epsilon"] > 0
    state, _ = algo.aggregate(1, state, [up])
    client.sync(model, algo.sync_payload(state, 0))
    changed = {n for n, p in params_of(model).items() if not torch.equal(before[n], p)}
    assert changed and all(".lora_" in n for n in changed) and any(".lora_B." in n for n in changed)


def test_replay_of_a_dp_runs_pairs_reproduces_the_clients_model(ktok, kfeats):
    """The client's own local model after its τ noised steps == a fresh client replaying the server's pairs."""
    algo, state, client, model = start(FedKSeedConfig(num_seeds=32, lr=1e-3), ktok)
    snap = {}
    for rnd in (1, 2):
        cfg = algo.configure_round(rnd, state, ["a"], {"steps": 4, "batch_size": 2, "seed": rnd}, ["a"])["a"]

        def last_step(t, loss):
            if t == 3:
                snap.update(params_of(model))

        up = client.train(model, TrainContext("a", kfeats[:20], ktok.pad_token_id, last_step), dict(cfg, privacy=priv()))
        state, _ = algo.aggregate(rnd, state, [up])
        client.sync(model, algo.sync_payload(state, state.version - 1))
    late = algo.make_client()
    late_model = late.setup(fresh(ktok), algo.setup_payload(state))
    late.sync(late_model, algo.sync_payload(state, -1))
    replayed = params_of(late_model)
    assert max((replayed[n].double() - snap[n].double()).abs().max().item() for n in snap) <= 1e-6
    assert all(torch.equal(replayed[n], p) for n, p in params_of(model).items())  # and the synced copy, exactly


def test_client_level_dp_refuses_fedkseed_with_the_reason():
    from fedtune.algorithms.wrappers.client_dp import ClientLevelDP
    from fedtune.privacy import PrivacyConfig

    with pytest.raises(ValueError, match="noise on all K per-seed sums") as e:
        ClientLevelDP(get_algorithm("fedkseed", FedKSeedConfig(num_seeds=8)),
                      PrivacyConfig(mode="client", noise_multiplier=1.0), clients_per_round=2, num_clients=4)
    assert "sample-level DP" in str(e.value) and "'fedkseed'" in str(e.value)
