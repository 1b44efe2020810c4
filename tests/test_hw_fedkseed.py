"""FedKSeed on other holdings: a bf16 base keeps float32 master weights (restore bit-exact, updates do not
vanish, forwards in bf16), replay is the same bits on every copy and device, LoRA on bf16 / nf4 bases, and
full-parameter tuning of a 4-bit/8-bit base refused with the reason and what to use."""

import math
from pathlib import Path

import pytest
import torch
from conftest import fresh, params_of

from fedtune.algorithms import ClientUpdate, TrainContext, get_algorithm
from fedtune.algorithms.fedkseed import FedKSeedConfig
from fedtune.algorithms.fedkseed.config import hardware_problem
from fedtune.models import load_model
from fedtune.models.hardware import HardwareError, placement, prepare_for_training
from fedtune.training import zo


def start(cfg: FedKSeedConfig, model, ktok):
    """(algo, state, client, model) synced to version 0 on the given base (the server's model: the fp32 tiny)."""
    algo = get_algorithm("fedkseed", cfg)
    state = algo.initialize(fresh(ktok), seed=0)
    client = algo.make_client()
    model = client.setup(model, algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    return algo, state, client, model


def train_cfg(algo, state, steps=3, seed=0) -> dict:
    return algo.configure_round(1, state, ["a"], {"steps": steps, "batch_size": 2, "seed": seed}, ["a"])["a"]


def changed_frac(a: dict, b: dict) -> float:
    return sum(int((a[n] != b[n]).sum()) for n in a) / sum(t.numel() for t in a.values())


def bf16_base():
    model, _ = load_model("tiny", dtype="bfloat16")
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random Llama (seed 0) as a Hugging Face model directory (bitsandbytes quantizes on loading)."""
    d = tmp_path_factory.mktemp("tiny-model")
    model, tok = load_model("tiny", seed=0)
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def nf4_base(tiny_dir: Path):
    pytest.importorskip("bitsandbytes")
    model, _ = load_model(str(tiny_dir), dtype="bfloat16", quantization="nf4")
    return prepare_for_training(model, gradient_checkpointing=False)


# --- the arithmetic --------------------------------------------------------------------------------------


def test_update_is_scale_times_z_rounded_then_added(ktok):
    """θ + scale·z is computed as round(round(scale·z) + θ) — two IEEE roundings, no fused multiply-add — so
    the bits are those of this formula on any device; materialize is still exactly z."""
    params = zo.zo_parameters(fresh(ktok))
    before = [p.detach().clone() for _, p in params]
    z = zo.materialize(params, 7)
    zo.perturb(params, 7, -3.7e-4)
    assert all(torch.equal(p, b + z_ * torch.tensor(-3.7e-4, dtype=torch.float32))
               for (_, p), b, z_ in zip(params, before, z))


def test_param_backup_is_dtype_agnostic_and_bit_exact():
    """bf16 / fp16 / fp32 / non-contiguous tensors spill to the file as raw bytes and come back bit-exactly
    (bf16 has no numpy type: the bytes are read as uint8)."""
    g = torch.Generator().manual_seed(0)
    params = [(f"p{i}", torch.randn(33, 7, generator=g).to(dt)) for i, dt in
              enumerate((torch.bfloat16, torch.float16, torch.float32))]
    params.append(("t", torch.randn(5, 9, generator=g).t()))  # non-contiguous: goes through a CPU copy
    before = [p.clone() for _, p in params]
    backup = zo.ParamBackup(params)
    assert backup.copy is None and backup.file.seek(0, 2) == sum(p.numel() * p.element_size() for _, p in params)
    for _, p in params:
        p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
    backup.restore()
    backup.close()
    assert all(torch.equal(p, b) for (_, p), b in zip(params, before))


# --- bf16 base, full parameters: float32 master weights, bf16 compute ------------------------------------


def test_bf16_full_round_restores_bit_exactly_with_fp32_masters_and_bf16_compute(ktok, kfeats):
    base = bf16_base()
    bf16_weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    algo, state, client, model = start(FedKSeedConfig(num_seeds=16, lr=1e-3), base, ktok)
    assert client.compute_dtype == torch.bfloat16  # the holding it was loaded with: the ZO forwards' compute dtype
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())  # master weights
    assert all(torch.equal(p, bf16_weights[n].float()) for n, p in model.named_parameters())  # exact upcast
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = params_of(model)
    up = client.train(model, TrainContext("a", kfeats[:20], ktok.pad_token_id), train_cfg(algo, state, steps=4))
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the ZO forwards compute in bf16 (autocast)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # restore: the same bits
    g = up.tensors["grad"]
    assert bool(torch.isfinite(g).all()) and bool((g != 0).all())  # ±εz did not vanish
    assert math.isfinite(up.metrics["train_loss"])


def test_bf16_replay_is_identical_on_two_copies_and_does_not_vanish(ktok):
    """The same (seed, coeff) pairs replayed on two bf16-loaded clients: the same bits; the fp32 masters move
    (η·g·z ≈ 1e-6·z), where the same updates on bf16 weights would leave almost every weight unchanged — and
    θ + εz − εz in bf16 is not θ either, which is why the masters are float32."""
    cfg = FedKSeedConfig(num_seeds=8)  # η = 1e-6, the full-mode default
    copies = [start(cfg, bf16_base(), ktok) for _ in range(2)]
    algo, state, _, _ = copies[0]
    up = ClientUpdate("a", 4, {"seed_idx": torch.tensor([0, 3, 5, 3], dtype=torch.int32),
                               "grad": torch.tensor([1.0, -2.0, 0.5, 0.25])})
    new, _ = algo.aggregate(1, state, [up])
    theta0 = params_of(copies[0][3])
    for _, _, client, model in copies:
        client.sync(model, algo.sync_payload(new, 0))
    a, b = params_of(copies[0][3]), params_of(copies[1][3])
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert changed_frac(a, theta0) > 0.99
    # the same pairs on the bf16 weights themselves: the updates vanish
    bf16 = [(n, p.to(torch.bfloat16)) for n, p in sorted(theta0.items())]
    ref = {n: p.clone() for n, p in bf16}
    seeds = copies[0][2].seeds
    for i, c in zip(new.tensors["v00001/seed_idx"].tolist(), new.tensors["v00001/coeff"].tolist()):
        zo.apply_update(bf16, seeds[i], c)
    assert changed_frac(dict(bf16), ref) < 0.1
    after = {n: p.clone() for n, p in bf16}
    zo.perturb(bf16, seeds[1], 5e-4)
    zo.perturb(bf16, seeds[1], -5e-4)
    assert changed_frac(dict(bf16), after) > 0.01  # bf16 θ + εz − εz ≠ θ


# --- LoRA on bf16 and 4-bit bases --------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_lora_mode_on_a_bf16_or_nf4_base_trains_the_fp32_factors_only(ktok, kfeats, tiny_dir, quantization):
    base = nf4_base(tiny_dir) if quantization == "nf4" else bf16_base()
    cfg = FedKSeedConfig(num_seeds=16, trainable="lora", rank=2, alpha=4, lr=1e-2)
    algo, state, client, model = start(cfg, base, ktok)
    assert placement(model).quantization == quantization
    names = [n for n, p in zo.zo_parameters(model)]
    assert names and all(".lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for _, p in zo.zo_parameters(model))
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}  # 4-bit codes and quant state too
    up = client.train(model, TrainContext("a", kfeats[:20], ktok.pad_token_id), train_cfg(algo, state))
    g = up.tensors["grad"]
    assert bool(torch.isfinite(g).all()) and bool((g != 0).any())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # restored, base untouched
    new, _ = algo.aggregate(1, state, [up])
    client.sync(model, algo.sync_payload(new, 0))
    changed = {n for n, t in model.state_dict().items() if not torch.equal(before[n], t)}
    assert changed and all(".lora_" in n for n in changed) and any(".lora_B." in n for n in changed)


# --- full parameters on a quantized base: refused -----------------------------------------------------------


def test_hardware_problem_says_why_and_what_to_use():
    for q, bits in (("nf4", "4-bit"), ("int8", "8-bit")):
        msg = hardware_problem("full", q)
        assert msg and "\n" not in msg and bits in msg and f'quantization = "{q}"' in msg
        assert "frozen quantized codes" in msg and "ε·z" in msg and "η·g·z" in msg  # why
        assert 'dtype = "bfloat16" with quantization = "none"' in msg and 'trainable = "lora"' in msg  # what
        assert all(m in msg for m in ("fedavg", "fedsb", "flora"))
    assert hardware_problem("full", "none") is None
    assert hardware_problem("lora", "nf4") is None and hardware_problem("lora", "int8") is None


def test_client_refuses_full_parameters_on_its_nf4_base(ktok, tiny_dir):
    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=4))
    payload = algo.setup_payload(algo.initialize(fresh(ktok), seed=0))
    with pytest.raises(HardwareError, match="frozen quantized codes") as e:
        algo.make_client().setup(nf4_base(tiny_dir), payload)
    assert isinstance(e.value, ValueError) and str(e.value) == hardware_problem("full", "nf4")


# --- CUDA --------------------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_replay_gives_the_same_bits_on_cpu_and_cuda(ktok, monkeypatch):
    monkeypatch.setattr(zo, "CHUNK", 30_000)  # several blocks, on worker threads
    cpu = fresh(ktok).requires_grad_(True)
    gpu = fresh(ktok).cuda().requires_grad_(True)
    pc, pg = zo.zo_parameters(cpu), zo.zo_parameters(gpu)
    theta0 = params_of(cpu)
    pairs = [(11, 3e-4), (5, -1.25e-3), (11, 7e-5), (2**40 + 3, 2.5e-3), (9, -1e-6)]
    for s, c in pairs:
        zo.apply_update(pc, s, c)
        zo.apply_update(pg, s, c)
    a, b = params_of(cpu), {n: p.cpu() for n, p in params_of(gpu).items()}
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert changed_frac(a, theta0) > 0.99
    # the backup of GPU parameters goes through the CPU file (no second θ on the GPU) and restores exactly
    backup = zo.ParamBackup(pg)
    assert backup.copy is None
    zo.perturb(pg, 3, 1e-3)
    backup.restore()
    backup.close()
    assert all(torch.equal(b[n], p.cpu()) for n, p in params_of(gpu).items())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_bf16_full_round_on_cuda_restores_bit_exactly(ktok, kfeats):
    base, _ = load_model("tiny", device="cuda", dtype="bfloat16")
    algo, state, client, model = start(FedKSeedConfig(num_seeds=16, lr=1e-3), base, ktok)
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters())
    before = params_of(model)
    up = client.train(model, TrainContext("a", kfeats[:20], ktok.pad_token_id), train_cfg(algo, state, steps=4))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    g = up.tensors["grad"]
    assert bool(torch.isfinite(g).all()) and bool((g != 0).all())
