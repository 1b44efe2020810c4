"""Hardware choices on every path: device / dtype / 4-bit and 8-bit bases / gradient checkpointing (CPU here; the
`gpu` tests run the same checks on CUDA when torch sees one). Models: a tiny random Llama saved as a model
directory, held in float32, bfloat16, NF4 or int8 as each test asks."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch

from fedtune import config
from fedtune.cli import main
from fedtune.config import ModelSection
from fedtune.models import fingerprint, load_base, load_model
from fedtune.models.hardware import placement, prepare_for_training
from fedtune.run.assemble import simulate

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random Llama (seed 0) as a Hugging Face model directory, float32 safetensors + tokenizer."""
    d = tmp_path_factory.mktemp("tiny-model")
    model, tok = load_model("tiny", seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def run_cfg(tmp: Path, model: Path, *, algorithm: str, dtype="float32", quantization="none", rounds=2,
            extra: str = "", gc=False) -> config.RunConfig:
    text = f"""
[run]
name = "hw"
rounds = {rounds}
algorithm = "{algorithm}"
out = "{tmp}/out-{algorithm}-{dtype}-{quantization}"
threads = 2
[model]
name = "{model}"
dtype = "{dtype}"
quantization = "{quantization}"
[federation]
num_clients = 2
[train]
local_steps = 2
batch_size = 4
lr = 5e-3
gradient_checkpointing = {str(gc).lower()}
[data]
max_train_per_client = 16
max_eval_per_client = 4
max_test_examples = 8
max_seq_len = 32
{extra}
"""
    p = tmp / f"{algorithm}-{dtype}-{quantization}.toml"
    p.write_text(text)
    return config.load(p)


# -- choices and their errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value", "says"), [
    ("model.device", "gpu", "model.device must be"), ("model.dtype", "fp8", "model.dtype must be one of"),
    ("model.quantization", "nf3", "model.quantization must be one of"),
])
def test_bad_choice_is_a_config_error(key, value, says):
    with pytest.raises(config.ConfigError, match=says):
        config.load(None, {key: value})


@pytest.mark.skipif(CUDA, reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_says_so(capsys, tmp_path):
    code = main(["simulate", "--model", "tiny", "--device", "cuda", "--rounds", "1", "--out", str(tmp_path / "o"),
                 "--no-progress"])
    assert code == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_auto_defaults():
    from fedtune.models.hardware import Placement

    pl = Placement.resolve()
    assert (pl.device.type, pl.dtype) == (("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32))
    assert Placement.resolve(quantization="nf4").dtype == torch.bfloat16  # QLoRA's compute dtype


def test_base_fingerprint_identifies_the_weights_not_the_holding(tiny_dir):
    """float32, bfloat16, NF4 and int8 holdings of one checkpoint: one base fingerprint, the float32 model's."""
    want = fingerprint(load_model(str(tiny_dir))[0])
    assert want == fingerprint(load_model("tiny", seed=0)[0]) == load_base(str(tiny_dir)).fingerprint
    for dtype, q in [("bfloat16", "none"), ("bfloat16", "nf4"), ("float32", "int8")]:
        base = load_base(str(tiny_dir), dtype=dtype, quantization=q)
        assert (base.holding.dtype, base.holding.quantization) == (getattr(torch, dtype), q)
        assert placement(base.model) == base.holding  # what the model shows agrees with what the loader says
        assert base.fingerprint == want
        assert fingerprint(base.model) != want  # the held tensors themselves differ
    assert load_base("tiny", seed=0, dtype="bfloat16").fingerprint == want


# -- every method, 2 rounds, bf16 and nf4 ---------------------------------------------------------------------
@pytest.mark.parametrize(("algorithm", "dtype", "quantization"), [
    ("fedavg", "bfloat16", "none"), ("fedavg", "bfloat16", "nf4"),
    ("fedsb", "bfloat16", "none"), ("fedsb", "bfloat16", "nf4"),
    ("flora", "bfloat16", "none"), ("flora", "bfloat16", "nf4"),
    ("fedkseed", "bfloat16", "none"),
])
def test_two_rounds_per_method(tmp_path, tiny_dir, algorithm, dtype, quantization):
    extra = "[fedkseed]\nlr = 1e-4\n" if algorithm == "fedkseed" else ""
    cfg = run_cfg(tmp_path, tiny_dir, algorithm=algorithm, dtype=dtype, quantization=quantization, extra=extra)
    s = simulate(cfg, progress=False)
    assert s["rounds_completed"] == 2
    assert s["hardware"] == {"device": "cpu", "dtype": dtype, "quantization": quantization,
                             "gradient_checkpointing": False}
    rows = [json.loads(x) for x in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) for r in rows[1:])
    assert set(s["client_hardware"]) == {"client-0", "client-1"}
    assert all(h["mem_peak_mb"] > 0 for h in s["client_hardware"].values())
    if algorithm != "fedkseed":
        assert (cfg.out_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_fedkseed_full_on_a_4bit_base_is_refused(tmp_path, tiny_dir):
    with pytest.raises(config.ConfigError, match="quantiz"):
        run_cfg(tmp_path, tiny_dir, algorithm="fedkseed", dtype="bfloat16", quantization="nf4")


# -- gradient checkpointing -----------------------------------------------------------------------------------
def lora_grads(model_dir: Path, feats, *, gc: bool, quantization="none", dtype="float32") -> dict[str, torch.Tensor]:
    from fedtune.algorithms.common.lora import activate, attach_lora, init_lora_factors, lora_shapes, set_lora_state
    from fedtune.data.format import collate

    model, _ = load_model(str(model_dir), dtype=dtype, quantization=quantization)
    model = prepare_for_training(model, gradient_checkpointing=gc)
    targets = ["q_proj", "v_proj"]
    model = attach_lora(model, adapter="default", rank=4, alpha=8.0, targets=targets)
    activate(model, "default")
    init = init_lora_factors(lora_shapes(model, targets), 4, seed=1)
    init = {k: (v if k.endswith(".A") else torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
            for k, v in init.items()}  # B ≠ 0: A's gradient is not trivially zero
    set_lora_state(model, "default", init)
    model.train()
    model(**collate(feats[:4], 3)).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, feats, quantization):
    dtype = "float32"
    plain = lora_grads(tiny_dir, feats, gc=False, quantization=quantization, dtype=dtype)
    ckpt = lora_grads(tiny_dir, feats, gc=True, quantization=quantization, dtype=dtype)
    assert plain.keys() == ckpt.keys() and len(plain) == 8
    assert all(g.dtype == torch.float32 for g in plain.values())  # float32 master weights on any base
    for k in plain:
        assert (plain[k] - ckpt[k]).abs().max().item() <= 1e-5, k
        assert plain[k].abs().max().item() > 0


def test_gradient_checkpointing_is_on_in_the_run(tmp_path, tiny_dir):
    cfg = run_cfg(tmp_path, tiny_dir, algorithm="fedavg", rounds=1, gc=True)
    assert simulate(cfg, progress=False)["hardware"]["gradient_checkpointing"] is True


# -- DP on a 4-bit base ---------------------------------------------------------------------------------------
def test_sample_level_dp_on_nf4(tmp_path, tiny_dir):
    extra = "[privacy]\nmode = \"sample\"\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n"
    cfg = run_cfg(tmp_path, tiny_dir, algorithm="fedavg", dtype="bfloat16", quantization="nf4", rounds=1,
                  extra=extra)
    s = simulate(cfg, progress=False)
    assert s["rounds_completed"] == 1 and s["epsilon"] > 0


def test_dp_keeps_the_4bit_base_and_trains_float32_lora(tiny_dir, feats):
    from fedtune.algorithms import get_algorithm
    from fedtune.algorithms.api import TrainContext

    cfg = config.load(None, {"model.name": str(tiny_dir)})
    algo = get_algorithm("fedavg", cfg.algorithm_config())
    model, _ = load_model(str(tiny_dir), dtype="bfloat16", quantization="nf4")
    model = prepare_for_training(model, gradient_checkpointing=False)
    state = algo.initialize(model, seed=0)
    client = algo.make_client()
    model = client.setup(model, algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    priv = {"mode": "sample", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"}
    up = client.train(model, TrainContext("c", feats[:32], 3), {"steps": 2, "batch_size": 4, "lr": 1e-2, "seed": 0,
                                                                 "privacy": priv})
    assert up.metrics["epsilon"] > 0
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in up.tensors.values())
    assert any((up.tensors[k] - state.tensors[k]).abs().max() > 0 for k in up.tensors)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


# -- the exported adapter on a 4-bit base, with plain peft ----------------------------------------------------
def test_exported_adapter_loads_with_plain_peft_on_the_4bit_base(tmp_path, tiny_dir, feats):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fedtune.data.format import collate
    from fedtune.run.evaluation import load_tuned

    cfg = run_cfg(tmp_path, tiny_dir, algorithm="fedavg", dtype="bfloat16", quantization="nf4", rounds=1)
    s = simulate(cfg, progress=False)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=q, dtype=torch.bfloat16,
                                                device_map="cpu")
    plain = PeftModel.from_pretrained(base, s["adapter"]).eval()
    ours = load_tuned(str(tiny_dir), adapter=s["adapter"], holding=ModelSection(dtype="bfloat16", quantization="nf4"))
    batch = collate(feats[:4], 3)
    with torch.no_grad():
        a = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = ours.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad(), plain.disable_adapter():
        c = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # plain bitsandbytes multiplies through its AVX512-BF16 repacked kernel, fedtune through the reference one:
    # the same model up to bf16 rounding, far below what the adapter changes
    gap, effect = (a.float() - b.float()).abs().max().item(), (a.float() - c.float()).abs().max().item()
    assert gap <= 0.02 and effect > 10 * gap, (gap, effect)


# -- heterogeneous clients over gRPC --------------------------------------------------------------------------
def test_grpc_run_with_an_fp32_client_and_an_nf4_client(tmp_path, tiny_dir):
    """One coordinator (float32), client-0 holding the base in float32, client-1 in NF4 + bf16 compute: the base
    fingerprints agree, the run completes, and the coordinator records how each client holds its model."""
    from fedtune.config import ClientSection
    from fedtune.run.serve import serve
    from fedtune.transports.grpc.agent import Agent

    ids = ["client-0", "client-1"]
    tokens = {c: f"token-{c}-0123456789abcdef" for c in ids}
    (tmp_path / "tokens.toml").write_text("".join(f'{c} = "{t}"\n' for c, t in tokens.items()))
    base = run_cfg(tmp_path, tiny_dir, algorithm="fedavg").to_dict()
    server_toml = tmp_path / "server.toml"
    server_toml.write_text((tmp_path / "fedavg-float32-none.toml").read_text() + f"""
[server]
address = "127.0.0.1:0"
tokens_file = "{tmp_path}/tokens.toml"
insecure = true
poll_interval_s = 0.05
heartbeat_interval_s = 0.2
lease_timeout_s = 30.0
finish_grace_s = 3.0
""")
    assert base["model"]["quantization"] == "none"
    cfg = config.load(server_toml, {"run.out": str(tmp_path / "srv")})
    ready, box, out = threading.Event(), [], {}
    t = threading.Thread(target=lambda: out.setdefault("s", serve(cfg, ready=ready, port_box=box)), daemon=True)
    t.start()
    assert ready.wait(60)
    results = {}
    agents = []
    for i, (dtype, q) in enumerate([("float32", "none"), ("bfloat16", "nf4")]):
        ccfg = config.load(server_toml, {"model.dtype": dtype, "model.quantization": q})
        agents.append(Agent(ccfg, ClientSection(server=f"127.0.0.1:{box[0]}", client_id=ids[i], partition=i,
                                                token=tokens[ids[i]], insecure=True, rpc_timeout_s=20,
                                                state_dir=str(tmp_path / f"state-{i}"))))
    assert agents[0].base.fingerprint == agents[1].base.fingerprint  # the weights' identity, whatever the holding
    threads = [threading.Thread(target=lambda a=a: results.setdefault(a.c.client_id, a.run()), daemon=True)
               for a in agents]
    for th in threads:
        th.start()
    t.join(300)
    for th in threads:
        th.join(30)
    assert results == dict.fromkeys(ids, 0)
    s = out["s"]
    assert s["rounds_completed"] == 2
    hw = s["client_hardware"]
    assert (hw["client-0"]["quantization"], hw["client-0"]["dtype"]) == ("none", "float32")
    assert (hw["client-1"]["quantization"], hw["client-1"]["dtype"]) == ("nf4", "bfloat16")
    assert all(h["mem_peak_mb"] > 0 for h in hw.values())


# -- CUDA (skipped without a GPU) -----------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("algorithm", "quantization"), [("fedavg", "nf4"), ("fedsb", "nf4"), ("flora", "nf4"),
                                                         ("fedkseed", "none")])
def test_two_rounds_on_cuda(tmp_path, tiny_dir, algorithm, quantization):
    cfg = run_cfg(tmp_path, tiny_dir, algorithm=algorithm, dtype="bfloat16", quantization=quantization)
    cfg.model.device = "cuda"
    s = simulate(cfg, progress=False)
    assert s["rounds_completed"] == 2 and s["hardware"]["device"].startswith("cuda")
    assert all(h.get("cuda_mem_peak_mb", 0) > 0 for h in s["client_hardware"].values())


@pytest.mark.gpu
@gpu
def test_gradient_checkpointing_same_gradients_on_cuda(tiny_dir, feats):
    from fedtune.algorithms.common.lora import activate, attach_lora  # noqa: F401 - same path as the CPU test

    for q in ("none", "nf4"):
        cfg_gc = [lora_grads_cuda(tiny_dir, feats, gc=g, quantization=q) for g in (False, True)]
        for k in cfg_gc[0]:
            assert (cfg_gc[0][k] - cfg_gc[1][k]).abs().max().item() <= 1e-5


def lora_grads_cuda(model_dir, feats, *, gc, quantization):
    from fedtune.algorithms.common.lora import activate, attach_lora
    from fedtune.data.format import collate
    from fedtune.models.hardware import to_device

    model, _ = load_model(str(model_dir), device="cuda", dtype="float32", quantization=quantization)
    model = prepare_for_training(model, gradient_checkpointing=gc)
    model = attach_lora(model, adapter="default", rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
    activate(model, "default")
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    model.train()
    model(**to_device(collate(feats[:4], 3), torch.device("cuda"))).loss.backward()
    return {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def test_4bit_gradients_survive_an_evaluation(tiny_dir, feats):
    """bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on the first eval-mode forward and then multiplies
    without autograd (no gradient through the layer); fedtune switches that off: an evaluation between rounds
    changes neither the gradients nor the held weights."""
    from fedtune.algorithms.common.lora import activate, attach_lora
    from fedtune.data.format import collate
    from fedtune.training.evaluate import evaluate

    model, _ = load_model(str(tiny_dir), dtype="bfloat16", quantization="nf4")
    model = prepare_for_training(model, gradient_checkpointing=False)
    model = attach_lora(model, adapter="default", rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
    activate(model, "default")
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    held = fingerprint(model)
    batch = collate(feats[:4], 3)

    def grads():
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    evaluate(model, feats[:8], pad_id=3)
    after = grads()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(g.abs().max() > 0 for g in after.values())
    assert fingerprint(model) == held
