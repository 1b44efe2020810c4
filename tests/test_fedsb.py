"""Fed-SB: exact R averaging, init, R-only training, export to a peft LoRA adapter, payload sizes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from fedtune.algorithms import ClientUpdate, GlobalState, TrainContext, get_algorithm
from fedtune.algorithms.api import example_weights
from fedtune.algorithms.fedsb import FedSB, FedSBConfig, sb_layers
from fedtune.data import ChatFormatter, collate, load_chatterbot
from fedtune.models import fingerprint, load_model

RANK = 4
TRAIN = {"steps": 3, "lr": 1e-2, "batch_size": 4}


@pytest.fixture(scope="module")
def tiny():
    base, tok = load_model("tiny")
    feats = ChatFormatter(tok, max_seq_len=64).many(load_chatterbot()[:160])
    return base, tok, feats


def make_algo(tiny, **kw) -> tuple[FedSB, GlobalState]:
    base, tok, feats = tiny
    algo = get_algorithm("fedsb", FedSBConfig(rank=RANK, init_batches=2, init_batch_size=8, **kw))
    algo.set_init_data(feats[:32], tok.pad_token_id)
    return algo, algo.initialize(base, seed=0)


def delta_w(layer) -> torch.Tensor:
    """W_eff − W measured through the forward pass: probe the layer with the identity (d_out×d_in)."""
    eye = torch.eye(layer.base_layer.in_features)
    with torch.no_grad():
        return (layer(eye) - layer.base_layer(eye)).T.double()


@pytest.fixture(scope="module")
def one_round(tiny):
    """A full round with 3 clients of sizes 10/20/30 on one local model, as the engine drives it."""
    base, tok, feats = tiny
    algo, st0 = make_algo(tiny)
    cl = algo.make_client()
    model = cl.setup(copy.deepcopy(base), algo.setup_payload(st0))
    cl.sync(model, algo.sync_payload(st0, -1))
    parts = {"a": feats[40:50], "b": feats[50:70], "c": feats[70:100]}
    conf = algo.configure_round(1, st0, list(parts), dict(TRAIN, seed=1), list(parts))
    ups = [cl.train(model, TrainContext(c, parts[c], tok.pad_token_id), conf[c]) for c in parts]
    st1, metrics = algo.aggregate(1, st0, ups)
    cl.sync(model, algo.sync_payload(st1, st0.version))
    return algo, cl, st0, st1, ups, metrics, model


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("kw, msg", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": -3}, "rank must be a positive integer"),
    ({"rank": "8"}, "rank must be a positive integer"),
    ({"target_modules": []}, "target_modules is empty"),
    ({"target_modules": "q_proj"}, "must be a list"),
    ({"init_mode": "svd"}, "init_mode must be one of ['sign', 'grad']"),
    ({"init_batches": 0}, "init_batches must be a positive integer"),
])
def test_bad_config_messages(kw, msg):
    with pytest.raises(ValueError) as e:
        FedSBConfig(**kw)
    assert msg in str(e.value)


def test_unknown_target_and_too_large_rank(tiny):
    base = tiny[0]
    with pytest.raises(ValueError) as e:
        FedSB(FedSBConfig(target_modules=["q_proj", "nope_proj"])).initialize(base, seed=0)
    assert "['nope_proj'] match no nn.Linear" in str(e.value) and "q_proj" in str(e.value)
    with pytest.raises(ValueError) as e:
        FedSB(FedSBConfig(target_modules=["nope_proj"])).initialize(base, seed=0)
    assert "none of the target modules ['nope_proj'] exist" in str(e.value)
    with pytest.raises(ValueError) as e:  # v_proj of the tiny model is 32×64
        FedSB(FedSBConfig(rank=40)).initialize(base, seed=0)
    assert "rank 40 exceeds min(d_out, d_in) = 32" in str(e.value)


# ---------------------------------------------------------------- exactness

def test_r_averaging_is_exact_random():
    g = torch.Generator().manual_seed(0)
    d_out, d_in, r, K = 24, 40, 6, 5
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    Rs = [torch.randn(r, r, generator=g, dtype=torch.float64) for _ in range(K)]
    p = torch.rand(K, generator=g, dtype=torch.float64)
    p = p / p.sum()
    lhs = B @ sum(pk * Rk for pk, Rk in zip(p, Rs)) @ A
    rhs = sum(pk * (B @ Rk @ A) for pk, Rk in zip(p, Rs))
    assert (lhs - rhs).abs().max() <= 1e-6


def test_round_delta_w_equals_weighted_client_deltas(one_round, tiny):
    algo, _, st0, st1, ups, _, model = one_round
    p = example_weights(ups)
    assert p == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    # a second, freshly set-up client that syncs from "never synced" must land on the same model
    fresh_cl = algo.make_client()
    fresh = fresh_cl.setup(copy.deepcopy(tiny[0]), algo.setup_payload(st1))
    fresh_cl.sync(fresh, algo.sync_payload(st1, -1))
    for m in (model, fresh):
        layers = sb_layers(m)
        assert sorted(layers) == sorted(k[:-2] for k in st0.tensors if k.endswith(".A"))
        for i, name in enumerate(sorted(layers)):  # R of module i (sorted names) at R[i]
            layer = layers[name]
            A, B = st0.tensors[f"{name}.A"].double(), st0.tensors[f"{name}.B"].double()
            client_deltas = [B @ u.tensors["R"][i].double() @ A for u in ups]
            expected = sum(pk * d for pk, d in zip(p, client_deltas))
            assert expected.abs().max() > 1e-4  # training moved R
            assert (delta_w(layer) - expected).abs().max() <= 1e-6, name


def test_aggregate_by_hand():
    A, B = torch.zeros(2, 3), torch.zeros(4, 2)  # r=2, d_in=3, d_out=4
    st = GlobalState(version=7, tensors={"m.A": A, "m.B": B, "R": torch.zeros(1, 2, 2)})
    Rs = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 3.0], [0.0, 0.0]]),
          torch.tensor([[0.0, 0.0], [6.0, -6.0]])]
    ups = [ClientUpdate(f"c{i}", n, {"R": R[None]}) for i, (n, R) in enumerate(zip((1, 2, 3), Rs))]
    algo = FedSB(FedSBConfig(rank=2, target_modules=["m"]))
    new, metrics = algo.aggregate(1, st, ups)
    # (1·R1 + 2·R2 + 3·R3) / 6 = [[1/6, 6/6], [18/6, -18/6]]
    assert torch.allclose(new.tensors["R"], torch.tensor([[[1 / 6, 1.0], [3.0, -3.0]]]), atol=1e-7)
    assert new.version == 8 and new.tensors["m.A"] is A and new.tensors["m.B"] is B
    assert torch.equal(st.tensors["R"], torch.zeros(1, 2, 2))  # pure: the input state is untouched
    assert metrics["fedsb_upload_bytes"] == 2 * 2 * 4
    assert metrics["fedsb_vs_lora_upload_ratio"] == pytest.approx(4 / (2 * (3 + 4)))
    uni, _ = FedSB(FedSBConfig(rank=2, target_modules=["m"], uniform=True)).aggregate(1, st, ups)
    assert torch.allclose(uni.tensors["R"], torch.tensor([[[1 / 3, 1.0], [2.0, -2.0]]]), atol=1e-7)
    with pytest.raises(ValueError, match="exactly one tensor 'R'"):
        algo.aggregate(1, st, [ClientUpdate("x", 1, {"m.R": torch.zeros(2, 2)})])
    with pytest.raises(ValueError, match=r"R has shape \(2, 2, 2\), expected \(1, 2, 2\)"):
        algo.aggregate(1, st, [ClientUpdate("x", 1, {"R": torch.zeros(2, 2, 2)})])


def test_packed_R_is_the_per_module_average_bit_for_bit(one_round):
    """Aggregating the packed [n, r, r] gives, module by module, exactly the weighted mean of that module's R."""
    from fedtune.algorithms.api import weighted_mean

    _, _, _, st1, ups, _, _ = one_round
    p = example_weights(ups)
    for i in range(st1.tensors["R"].shape[0]):
        assert torch.equal(st1.tensors["R"][i], weighted_mean([u.tensors["R"][i] for u in ups], p))


# ---------------------------------------------------------------- init

@pytest.mark.parametrize("mode", ["sign", "grad"])
def test_init_orthonormal_and_reproducible(tiny, mode):
    base = tiny[0]
    fp, flags = fingerprint(base), [p.requires_grad for p in base.parameters()]
    _, s1 = make_algo(tiny, init_mode=mode)
    _, s2 = make_algo(tiny, init_mode=mode)
    _, s3 = make_algo(tiny, init_mode=mode, init_seed=123)
    assert s1.meta["init"] == f"data-{mode}"
    eye = torch.eye(RANK)
    mods = sorted(k[:-2] for k in s1.tensors if k.endswith(".A"))
    assert len(mods) == 4  # q_proj, v_proj × 2 layers
    assert torch.equal(s1.tensors["R"], torch.zeros(4, RANK, RANK))
    for m in mods:
        A, B = s1.tensors[f"{m}.A"], s1.tensors[f"{m}.B"]
        assert (A @ A.T - eye).abs().max() <= 1e-5 and (B.T @ B - eye).abs().max() <= 1e-5
        assert torch.equal(A, s2.tensors[f"{m}.A"]) and torch.equal(B, s2.tensors[f"{m}.B"])
    assert any(not torch.equal(s1.tensors[f"{m}.A"], s3.tensors[f"{m}.A"]) for m in mods)  # batches/SVD seeded
    # the init read the model without changing it
    assert fingerprint(base) == fp and [p.requires_grad for p in base.parameters()] == flags
    assert all(p.grad is None for p in base.parameters())


def test_random_init_fallback_warns(tiny, caplog):
    with caplog.at_level(logging.WARNING):
        st = FedSB(FedSBConfig(rank=RANK)).initialize(tiny[0], seed=5)
    assert "no init data" in caplog.text and st.meta["init"] == "random"
    for m in (k[:-2] for k in st.tensors if k.endswith(".A")):
        A, B = st.tensors[f"{m}.A"], st.tensors[f"{m}.B"]
        assert (A @ A.T - torch.eye(RANK)).abs().max() <= 1e-5 and (B.T @ B - torch.eye(RANK)).abs().max() <= 1e-5


# ---------------------------------------------------------------- client

def test_only_R_trains_and_model_is_restored(tiny):
    base, tok, feats = tiny
    algo, st = make_algo(tiny)
    cl = algo.make_client()
    model = cl.setup(copy.deepcopy(base), algo.setup_payload(st))
    assert fingerprint(model) == fingerprint(base)  # wrapping changes no base weight, names map back
    cl.sync(model, algo.sync_payload(st, -1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = collate(feats[:4], tok.pad_token_id)
    logits0 = model(**batch).logits.detach()
    checked = []

    def on_step(step: int, loss: float) -> None:  # mid-training: after the optimiser step
        for n, p in model.named_parameters():
            if n.endswith(".sb_R.weight"):
                assert p.requires_grad
            else:
                assert not p.requires_grad and torch.equal(p, before[n]), n
        checked.append(sum(not torch.equal(p, before[n]) for n, p in model.named_parameters()))

    up = cl.train(model, TrainContext("a", feats[:20], tok.pad_token_id, on_step=on_step), dict(TRAIN, seed=3))
    assert len(checked) == TRAIN["steps"] and checked[-1] == 4  # exactly the 4 R matrices moved
    assert list(up.tensors) == ["R"] and up.tensors["R"].shape == (4, RANK, RANK)
    assert all(r.abs().sum() > 0 for r in up.tensors["R"])  # every module's R moved
    for n, p in model.named_parameters():  # train() left the model at the synced global state
        assert torch.equal(p, before[n]), n
    assert torch.equal(model(**batch).logits, logits0)
    assert not algo.sync_payload(st, st.version).tensors  # already current: nothing to send


def test_payload_bytes(one_round):
    algo, _, st0, st1, ups, metrics, _ = one_round
    n_mod = 4
    for u in ups:
        assert list(u.tensors) == ["R"] and u.tensors["R"].shape == (n_mod, RANK, RANK)
        assert sum(t.numel() * t.element_size() for t in u.tensors.values()) == n_mod * RANK**2 * 4
    assert metrics["fedsb_upload_bytes"] == n_mod * RANK**2 * 4
    # tiny Llama: q_proj 64→64, v_proj 64→32; LoRA would send r·(d_in+d_out) per module
    assert metrics["fedsb_vs_lora_upload_ratio"] == pytest.approx(
        n_mod * RANK**2 / (RANK * (2 * (64 + 64) + 2 * (64 + 32))))
    setup, sync = algo.setup_payload(st0), algo.sync_payload(st1, 0)
    assert all(k.endswith((".A", ".B")) for k in setup.tensors) and len(setup.tensors) == 2 * n_mod
    assert list(sync.tensors) == ["R"] and sync.tensors["R"] is st1.tensors["R"] and setup.meta["rank"] == RANK


def test_export_is_a_peft_lora_adapter(one_round, tiny):
    from peft import LoraConfig, get_peft_model

    from fedtune.algorithms.common.lora import lora_layers

    algo, cl, _, _, _, _, model = one_round
    base, tok, feats = tiny
    factors = cl.export_factors(model)
    assert len(factors) == 4 and all(a.shape[0] == RANK and b.shape[1] == RANK for a, b in factors.values())
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=RANK, lora_alpha=RANK, target_modules=list(algo.config.target_modules), lora_dropout=0.0))
    layers = lora_layers(peft_model, "default")
    assert sorted(layers) == sorted(factors)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layers[name].lora_A["default"].weight.copy_(a)
            layers[name].lora_B["default"].weight.copy_(b)
    peft_model.eval()
    batch = collate(feats[:6], tok.pad_token_id)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (ref - plain).abs().max() > 1e-4  # the adapter does something
    assert (ref - out).abs().max() <= 1e-5


def test_opacus_per_sample_grads_of_R(one_round, tiny):
    pytest.importorskip("opacus")
    from opacus import GradSampleModule

    algo, _, _, st1, _, _, _ = one_round
    base, tok, feats = tiny
    cl = algo.make_client()
    model = cl.setup(copy.deepcopy(base), algo.setup_payload(st1))
    cl.sync(model, algo.sync_payload(st1, -1))
    gsm = GradSampleModule(model)
    gsm(**collate(feats[:3], tok.pad_token_id)).loss.backward()
    trained = [(n, p) for n, p in gsm.named_parameters() if p.requires_grad]
    assert len(trained) == 4 and all(n.endswith(".sb_R.weight") for n, _ in trained)
    for _, p in trained:  # per-sample gradients of R exist and average to the batch gradient
        assert p.grad_sample.shape == (3, RANK, RANK)
        assert (p.grad_sample.mean(0) - p.grad).abs().max() <= 1e-6
