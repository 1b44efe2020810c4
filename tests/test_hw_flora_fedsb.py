"""FLoRA and Fed-SB on a base that is not float32 (bfloat16, bitsandbytes nf4), on the CPU.

FLoRA keeps the cumulative ΔW beside the rounded / quantized base (a float32 forward hook), so the global
model is W₀ + ΔW to float32 rounding, where merging into the base ("requantize and merge") loses most of it.
Fed-SB keeps float32 A/R/B beside the base, takes its data init through hooks on a quantized base, and trains
under opacus sample-level DP with the 4-bit base bit-identical."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit

from fedtune.algorithms import ClientUpdate, TrainContext, get_algorithm
from fedtune.algorithms.common.lora import target_linears
from fedtune.algorithms.fedsb import FedSBConfig, sb_layers
from fedtune.algorithms.flora import FLoRAConfig
from fedtune.algorithms.flora.client import CumulativeDelta, delta_hooks
from fedtune.algorithms.flora.shared import cumulative_delta
from fedtune.data import ChatFormatter, load_chatterbot
from fedtune.models import hardware
from fedtune.models.loading import load_model
from fedtune.privacy import PrivacyConfig

TRAIN = {"steps": 2, "lr": 1e-2, "batch_size": 4}
HOLDINGS = {"bf16": {"dtype": "bfloat16"}, "nf4": {"quantization": "nf4"}, "nf4-bf16": {"quantization": "nf4",
                                                                                       "dtype": "bfloat16"}}


@pytest.fixture(scope="module")
def data():
    _, tok = load_model("tiny")
    return tok.pad_token_id, ChatFormatter(tok, max_seq_len=32).many(load_chatterbot()[:80])


def _base_bits(model, targets) -> dict[str, torch.Tensor]:
    return {n: lin.weight.detach().clone() for n, lin in target_linears(model, targets).items()}


def _dequant(lin) -> torch.Tensor:
    """W₀ as the layer computes with it, float32."""
    w = lin.weight
    if getattr(w, "quant_state", None) is not None:
        return dequantize_4bit(w.data, w.quant_state).float()
    return w.detach().float()


def _requantize_merge(w0: torch.Tensor, deltas: list[torch.Tensor], like) -> torch.Tensor:
    """What merging ΔW into the base every round would hold: W ← round(W + ΔW_round) per round, where round
    is nf4 quantize→dequantize (bitsandbytes, double quantization, as load_model) or a bfloat16 cast."""
    w = w0.clone()
    for d in deltas:
        if getattr(like.weight, "quant_state", None) is not None:
            q, st = quantize_4bit((w.double() + d).float(), quant_type="nf4", compress_statistics=True)
            w = dequantize_4bit(q, st).float()
        else:
            w = (w.double() + d).to(like.weight.dtype).float()
    return w


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------- FLoRA

@pytest.mark.parametrize("holding", ["bf16", "nf4", "nf4-bf16"])
def test_flora_global_delta_exact_beside_low_precision_base(holding, data):
    pad, feats = data
    algo = get_algorithm("flora", FLoRAConfig(rank=4, alpha=8.0))
    model, _ = load_model("tiny", **HOLDINGS[holding])
    model = hardware.prepare_for_training(model, gradient_checkpointing=holding == "nf4")
    assert not hardware.placement(model).exact
    state = algo.initialize(model, seed=0)
    client = algo.make_client()
    model = client.setup(model, algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    targets = client.targets
    linears = target_linears(model, targets)
    bits0 = _base_bits(model, targets)
    w0 = {n: _dequant(lin) for n, lin in linears.items()}
    parts = {"a": feats[:12], "b": feats[12:32]}
    round_deltas: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    for rnd in (1, 2, 3):
        conf = algo.configure_round(rnd, state, list(parts), dict(TRAIN, seed=rnd), list(parts))
        ups = [client.train(model, TrainContext(c, parts[c], pad), conf[c]) for c in parts]
        for u in ups:
            assert all(t.device.type == "cpu" and t.dtype == torch.float32 and t.isfinite().all()
                       for t in u.tensors.values())
            assert math.isfinite(u.metrics["train_loss"])
        old = state.tensors
        state, _ = algo.aggregate(rnd, state, ups)
        for n in linears:  # this round's ΔW, for the requantize-and-merge comparison
            prev = cumulative_delta(old, n)
            round_deltas[n].append(cumulative_delta(state.tensors, n)[0] - (0 if prev is None else prev[0]))
        client.sync(model, algo.sync_payload(state, rnd - 1))
    assert all(torch.equal(bits0[n], lin.weight) for n, lin in linears.items())  # W₀ never written
    hooks = delta_hooks(linears)
    assert set(hooks) == set(linears)
    errs, drift, out_errs = [], [], []
    for n, lin in linears.items():
        ref = cumulative_delta(state.tensors, n)[0]  # float64, the server's global ΔW
        eye = torch.eye(lin.in_features, dtype=torch.bfloat16 if "bf16" in holding else torch.float32)
        with torch.no_grad():  # what the hook adds for x = I, before the cast to the output dtype: ΔWᵀ
            got = hooks[n](lin, (eye,), torch.zeros(lin.in_features, lin.out_features)).T
        errs.append(_rel(got, ref))
        errs.append(_rel(hooks[n].weight(), ref))
        drift.append(_rel(_requantize_merge(w0[n], round_deltas[n], lin) - w0[n], ref))
        if holding == "nf4":  # float32 compute: the layer's whole output is x·(W₀ + ΔW)ᵀ
            x = torch.randn(5, lin.in_features, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                out_errs.append(_rel(lin(x) - lin.forward(x), x.double() @ ref.T))
                assert (lin(x) - x @ (w0[n] + ref.float()).T).abs().max() < 1e-5
    worst, least_drift = max(errs + out_errs), min(drift)
    assert worst < 1e-6, f"{holding}: kept ΔW off the fp32 reference by {worst:.3g} (relative Frobenius)"
    assert least_drift > max(1e-3, 1000 * worst), f"{holding}: requantize-and-merge drift only {least_drift:.3g}"
    print(f"\n{holding}: kept ΔW rel. error ≤ {worst:.2e}; requantize-and-merge (3 rounds) rel. error "
          f"{least_drift:.3g} … {max(drift):.3g}")
    factors = client.export_factors(model)  # the SVD of the kept cumulative ΔW
    for n, (a, b) in factors.items():
        assert _rel(b.double() @ a.double(), cumulative_delta(state.tensors, n)[0]) < 1e-5


def test_flora_fork_shares_kept_delta(data):
    _, feats = data
    algo = get_algorithm("flora", FLoRAConfig(rank=4, alpha=8.0))
    model, _ = load_model("tiny", quantization="nf4")
    state = algo.initialize(model, seed=0)
    client = algo.make_client()
    model = client.setup(model, algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    fork = client.fork(model)
    g = torch.Generator().manual_seed(0)
    shapes = state.meta["modules"]
    ups = [ClientUpdate(c, 10, {**{f"{m}.A": torch.randn(4, s[1], generator=g) * 0.1 for m, s in shapes.items()},
                                **{f"{m}.B": torch.randn(s[0], 4, generator=g) * 0.01 for m, s in shapes.items()}})
           for c in "ab"]
    state, _ = algo.aggregate(1, state, ups)
    client.sync(model, algo.sync_payload(state, 0))
    mine, theirs = delta_hooks(target_linears(model, client.targets)), delta_hooks(target_linears(fork, client.targets))
    assert all(mine[n] is theirs[n] and isinstance(mine[n], CumulativeDelta) for n in mine)
    ids = torch.tensor([feats[0]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fork(input_ids=ids).logits)
    again = delta_hooks(target_linears(copy.deepcopy(fork), client.targets))
    assert all(again[n] is mine[n] for n in mine)  # any deep copy shares the hook
    # a second setup on the same model does not stack a second hook
    client.setup(model, algo.setup_payload(state))
    assert all(sum(isinstance(h, CumulativeDelta) for h in lin._forward_hooks.values()) == 1
               for lin in target_linears(model, client.targets).values())


# ---------------------------------------------------------------- Fed-SB

def _fedsb(holding, data, rank=4, **kw):
    pad, feats = data
    algo = get_algorithm("fedsb", FedSBConfig(rank=rank, init_batches=2, init_batch_size=8, **kw))
    algo.set_init_data(feats[:32], pad)
    model, _ = load_model("tiny", **HOLDINGS.get(holding, {}))
    return algo, model


@pytest.mark.parametrize("holding", ["bf16", "nf4"])
def test_fedsb_two_rounds_on_low_precision_base(holding, data):
    pad, feats = data
    algo, model = _fedsb(holding, data)
    state = algo.initialize(model, seed=0)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.tensors.values())
    client = algo.make_client()
    model = client.setup(model, algo.setup_payload(state))
    targets = algo.config.target_modules
    bits0 = _base_bits(model, targets)
    for layer in sb_layers(model).values():
        assert all(m.weight.dtype == torch.float32 for m in (layer.sb_A, layer.sb_R, layer.sb_B))
    parts = {"a": feats[32:44], "b": feats[44:64]}
    for rnd in (1, 2):
        client.sync(model, algo.sync_payload(state, rnd - 2))
        conf = algo.configure_round(rnd, state, list(parts), dict(TRAIN, seed=rnd), list(parts))
        ups = [client.train(model, TrainContext(c, parts[c], pad), conf[c]) for c in parts]
        for u in ups:
            r = u.tensors["R"]
            assert r.device.type == "cpu" and r.dtype == torch.float32 and r.isfinite().all()
            assert not torch.equal(r, state.tensors["R"])  # R trained
        state, _ = algo.aggregate(rnd, state, ups)
    client.sync(model, algo.sync_payload(state, 1))
    assert all(torch.equal(bits0[n], lin.weight) for n, lin in target_linears(model, targets).items())
    assert state.tensors["R"].abs().sum() > 0
    factors = client.export_factors(model)
    shapes = {n: (lin.out_features, lin.in_features) for n, lin in target_linears(model, targets).items()}
    assert set(factors) == set(shapes)
    for n, (a, b) in factors.items():
        assert a.shape == (4, shapes[n][1]) and b.shape == (shapes[n][0], 4)
        assert a.device.type == b.device.type == "cpu" and a.dtype == b.dtype == torch.float32
        assert b.isfinite().all() and b.abs().sum() > 0


@pytest.mark.parametrize("mode", ["grad", "sign"])
def test_fedsb_data_init_on_nf4_close_to_fp32(mode, data):
    """Orthonormal A (r×d_in) and B (d_out×r) from ∇W taken through hooks on the nf4 base; the subspaces are
    those of the fp32 base's init up to the 4-bit rounding of the weights the gradient was taken on."""
    rank = 4
    ref_algo, ref_model = _fedsb("fp32", data, rank, init_mode=mode)
    ref = ref_algo.initialize(ref_model, seed=0).tensors
    algo, model = _fedsb("nf4", data, rank, init_mode=mode)
    got = algo.initialize(model, seed=0).tensors
    assert set(got) == set(ref)
    eye = torch.eye(rank)
    overlap = []
    for k in sorted(k for k in got if k.endswith((".A", ".B"))):
        assert got[k].shape == ref[k].shape and got[k].dtype == torch.float32
        m = got[k] @ got[k].T if k.endswith(".A") else got[k].T @ got[k]
        assert (m - eye).abs().max() < 1e-5  # orthonormal rows / columns
        # subspace overlap ‖PᵀQ‖²_F / r: 1 = the same subspace
        p, q = (got[k].T, ref[k].T) if k.endswith(".A") else (got[k], ref[k])
        overlap.append(float((p.T @ q).norm() ** 2 / rank))
    print(f"\nfedsb {mode} init nf4 vs fp32: subspace overlap min {min(overlap):.3f}, mean "
          f"{sum(overlap) / len(overlap):.3f}")
    assert min(overlap) > (0.8 if mode == "grad" else 0.5), overlap


def test_fedsb_sample_dp_on_nf4(data):
    pad, feats = data
    algo, model = _fedsb("nf4", data)
    state = algo.initialize(model, seed=0)
    client = algo.make_client()
    model = client.setup(model, algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    bits0 = {n: t.clone() for n, t in model.state_dict().items() if ".sb_" not in n}
    priv = PrivacyConfig(mode="sample", noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=7).to_dict()
    conf = dict(TRAIN, seed=1, privacy=priv)
    up = client.train(model, TrainContext("a", feats[:24], pad), conf)
    r = up.tensors["R"]
    assert r.isfinite().all() and r.abs().sum() > 0 and math.isfinite(up.metrics["train_loss"])
    assert up.metrics["epsilon"] > 0
    after = model.state_dict()
    assert all(torch.equal(bits0[n], after[n]) for n in bits0)  # 4-bit base (and its quant state) untouched
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
