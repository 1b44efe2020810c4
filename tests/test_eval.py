"""Held-out evaluation, generation, baselines and per-method lr (issue 11), on the tiny model."""

import json
import math
import sys
from pathlib import Path

import pytest

from fedtune import config
from fedtune.cli import main
from fedtune.run.assemble import simulate
from fedtune.run.evaluation import GenConfig, generate, load_tuned

FAST = {"model.name": "tiny", "federation.num_clients": 2, "run.rounds": 2, "train.local_steps": 6, "train.lr": 5e-3,
        "data.max_seq_len": 48, "data.max_eval_per_client": 4, "data.max_test_examples": 8, "run.algorithm": "fedavg"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A FedAvg run on a small JSONL file (its own training data for the eval test)."""
    d = tmp_path_factory.mktemp("eval")
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say hi {i % 4}", "response": "hello there friend"}) + "\n"
                            for i in range(40)))
    out = d / "run"
    summary = simulate(config.load(None, {**FAST, "run.out": str(out), "data.source": "jsonl",
                                          "data.paths": [str(data)], "data.partition": "iid"}), progress=False)
    return out, data, summary


def test_rows_and_summary_carry_test_loss(trained):
    out, _, summary = trained
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(math.isfinite(r["test_loss"]) for r in rows)
    assert summary["test_loss_first"] == rows[0]["test_loss"] and summary["test_loss_final"] == rows[-1]["test_loss"]
    assert summary["test_examples"] == 4  # round(40 · 0.1), under the cap of 8
    assert set(summary["client_eval_loss_final"]) == {"client-0", "client-1"}


def test_eval_reproduces_the_run_and_beats_base_on_training_data(trained, tmp_path, capsys):
    out, data, summary = trained
    assert main(["eval", "--adapter", str(out / "adapter"), "--json", str(tmp_path / "a.json")]) == 0
    own = json.loads((tmp_path / "a.json").read_text())["sets"]
    # the run's own config rebuilds the same test set: the exported adapter scores what the engine logged
    assert own["test"]["loss"] == pytest.approx(summary["test_loss_final"], abs=1e-5)
    assert own["client-0"]["loss"] == pytest.approx(summary["client_eval_loss_final"]["client-0"], abs=1e-5)
    assert own["test"]["perplexity"] == pytest.approx(math.exp(own["test"]["loss"]))
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", str(data), "--json", str(tmp_path / "t.json")]) == 0
    assert main(["eval", "--base", "--run", str(out), "--data", str(data), "--json", str(tmp_path / "b.json")]) == 0
    tuned = json.loads((tmp_path / "t.json").read_text())["sets"][str(data)]
    base = json.loads((tmp_path / "b.json").read_text())["sets"][str(data)]
    assert tuned["examples"] == base["examples"] == 40
    assert tuned["loss"] < base["loss"] - 0.1
    assert "perplexity" in capsys.readouterr().out
    # the run's own results (the default eval-adapter.json) are not replaced by a --data evaluation without --force
    assert main(["eval", "--adapter", str(out / "adapter")]) == 0
    default = out / "eval-adapter.json"
    assert json.loads(default.read_text())["data"] == "run"
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", str(data)]) == 2
    assert f"{default} holds the results on 'run', not {[str(data)]!r}: pass --json PATH" in capsys.readouterr().err
    assert json.loads(default.read_text())["data"] == "run"
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", str(data), "--force"]) == 0
    assert json.loads(default.read_text())["data"] == [str(data)]


def test_eval_usage_errors_exit_2(tmp_path, capsys):
    assert main(["eval", "--adapter", str(tmp_path)]) == 2
    assert main(["eval", "--base"]) == 2
    assert main(["eval", "--base", "--adapter", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 3


def test_greedy_generation_is_deterministic_and_sampling_is_seeded(trained):
    out, _, _ = trained
    m = load_tuned("tiny", adapter=str(out / "adapter"))
    msgs = [{"role": "user", "content": "say hi 1"}]
    greedy = GenConfig(max_new_tokens=8)
    assert generate(m.model, m.tokenizer, msgs, greedy) == generate(m.model, m.tokenizer, msgs, greedy)
    s1, s2 = GenConfig(max_new_tokens=8, sample=True, seed=3), GenConfig(max_new_tokens=8, sample=True, seed=3)
    assert generate(m.model, m.tokenizer, msgs, s1) == generate(m.model, m.tokenizer, msgs, s2)


def test_generate_and_chat_cli(trained, capsys, monkeypatch):
    out, _, _ = trained
    args = ["generate", "--adapter", str(out / "adapter"), "--prompt", "say hi 2", "--max-new-tokens", "6"]
    assert main(args + ["--compare-base"]) == 0
    text = capsys.readouterr().out
    assert "[base]" in text and "[tuned]" in text
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("say hi 1\nsay hi 2\n\n"))
    assert main(["chat", "--adapter", str(out / "adapter"), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("assistant:") == 2


def test_test_split_skipped_cleanly(tmp_path):
    s = simulate(config.load(None, {**FAST, "run.rounds": 1, "train.local_steps": 1, "data.test_fraction": 0.0,
                                    "run.out": str(tmp_path / "r")}), progress=False)
    assert s["test_loss_final"] is None and s["test_skipped"] and s["test_examples"] == 0


def test_method_lr_resolution():
    def lr(**ov):
        return config.load(None, {"model.name": "tiny", **ov}).learning_rate()

    from fedtune.algorithms.fedsb.config import FedSBConfig

    assert lr(**{"run.algorithm": "fedsb"}) == FedSBConfig.DEFAULT_LR  # no lr anywhere: the method's default
    assert lr(**{"run.algorithm": "fedsb", "train.lr": 2e-3}) == 2e-3  # [train] lr beats the default
    assert lr(**{"run.algorithm": "fedsb", "train.lr": 2e-3, "fedsb.lr": 7e-2}) == 7e-2  # [fedsb] lr beats both
    assert lr(**{"run.algorithm": "fedkseed", "train.lr": 2e-3}) != 2e-3  # ZO keeps its own η
    with pytest.raises(config.ConfigError, match="lr"):
        lr(**{"run.algorithm": "fedavg", "fedavg.lr": -1.0})


def test_baselines_same_budget(tmp_path):
    from fedtune.run.baselines import simulate_baseline

    cfg = config.load(None, {**FAST, "federation.num_clients": 3, "run.rounds": 1, "train.local_steps": 2,
                             "run.out": str(tmp_path / "local")})
    loc = simulate_baseline(cfg, "local", progress=False)
    assert loc["steps_per_round"] == {"client-0": 2, "client-1": 2, "client-2": 2}
    assert set(loc["client_eval_loss_final"]) == {"client-0", "client-1", "client-2"}
    assert all(Path(m["adapter"]).is_dir() for m in loc["models"].values())
    cfg.run.out = str(tmp_path / "central")
    cen = simulate_baseline(cfg, "central", progress=False)
    # the federation's step budget: 2 steps per round, at 3 clients' batches pooled (the same examples seen)
    assert cen["steps_per_round"] == {"central": 2} and cen["batch_size"] == {"central": 3 * cfg.train.batch_size}
    cfg.run.out = str(tmp_path / "central-seq")
    seq = simulate_baseline(cfg, "central-seq", progress=False)
    # the same examples in sequential steps: 3 clients × 2 steps at the clients' batch size
    assert seq["steps_per_round"] == {"central-seq": 6} and seq["batch_size"] == {"central-seq": cfg.train.batch_size}
    assert Path(seq["models"]["central-seq"]["adapter"]).is_dir()
    assert cen["test_loss_first"] == pytest.approx(loc["test_loss_first"])  # both start from the base


def test_eval_generate_scores_each_set(trained, tmp_path, capsys):
    pytest.importorskip("rouge_score")
    out, data, _ = trained
    args = ["eval", "--adapter", str(out / "adapter"), "--generate", "--max-examples", "3", "--max-new-tokens", "8"]
    assert main(args + ["--json", str(tmp_path / "g.json")]) == 0
    sets = json.loads((tmp_path / "g.json").read_text())["sets"]
    # 4 test examples, capped at 3; each client's slice holds 2
    assert (sets["test"]["generated"], sets["client-0"]["generated"], sets["client-1"]["generated"]) == (3, 2, 2)
    assert "rouge_l" not in sets["eval"]  # the union of the client rows is not generated twice
    assert all(0.0 <= sets[s]["rouge_l"] <= 1.0 and sets[s]["exact_match"] * sets[s]["generated"] in (0, 1, 2, 3)
               for s in ("test", "client-0", "client-1"))
    assert "rouge_l" in capsys.readouterr().out
    # the same model and examples through the library: the same scores
    from fedtune.data import ChatFormatter
    from fedtune.data.loaders import load_path
    from fedtune.training.genmetrics import generation_metrics

    m = load_tuned("tiny", adapter=str(out / "adapter"))
    assert main(args + ["--data", str(data), "--json", str(tmp_path / "d.json")]) == 0
    row = json.loads((tmp_path / "d.json").read_text())["sets"][str(data)]
    feats = ChatFormatter(m.tokenizer, 48).many(load_path(str(data)))
    assert generation_metrics(m.model, m.tokenizer, feats, max_examples=3, max_new_tokens=8) == {
        k: row[k] for k in ("generated", "rouge_l", "exact_match")}


def _mc_task(d: Path) -> Path:
    """A local multiple-choice lm-eval task: 6 questions, 3 choices each (no network)."""
    rows = [{"question": f"say hi {i}", "choices": ["hello there friend", "goodbye", "the sky is green"],
             "answer": 0} for i in range(6)]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    y = d / "fedtune_mc.yaml"
    y.write_text(f"""task: fedtune_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return y


def test_eval_lm_eval_local_task_adapter_vs_base(trained, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out, _, _ = trained
    y = _mc_task(tmp_path)
    common = ["--tasks", str(y), "--limit", "6", "--no-losses"]
    assert main(["eval", "--adapter", str(out / "adapter"), *common, "--compare-base", "--json", str(tmp_path / "t.json")]) == 0
    text = capsys.readouterr().out
    assert "fedtune_mc acc" in text and "adapter" in text and "base" in text
    tasks = json.loads((tmp_path / "t.json").read_text())["tasks"]
    assert set(tasks) == {"adapter", "base"}
    for col in tasks.values():
        acc = col["fedtune_mc"]["acc"]
        assert 0.0 <= acc <= 1.0 and round(acc * 6) == pytest.approx(acc * 6)  # k of 6 questions
    # --compare-base switches the adapter off: exactly what `--base` scores
    assert main(["eval", "--base", "--run", str(out), *common, "--json", str(tmp_path / "b.json")]) == 0
    base = json.loads((tmp_path / "b.json").read_text())["tasks"]["base"]
    assert base["fedtune_mc"]["acc"] == tasks["base"]["fedtune_mc"]["acc"]


def test_generate_every_logs_rouge_l_in_metrics(tmp_path):
    pytest.importorskip("rouge_score")
    out = tmp_path / "r"
    s = simulate(config.load(None, {**FAST, "run.rounds": 3, "train.local_steps": 1, "run.generate_every": 2,
                                    "run.generate_max_examples": 2, "run.out": str(out)}), progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # round 0, every 2nd round and the last: rounds 0, 2, 3
    assert [r["round"] for r in rows if "test_rouge_l" in r] == [0, 2, 3]
    assert all(r["test_generated"] == 2 and 0 <= r["test_rouge_l"] <= 1 for r in rows if "test_rouge_l" in r)
    assert s["test_examples"] >= 2
    # the logged score is what `fedtune eval --generate` gives the exported final model
    assert main(["eval", "--adapter", str(out / "adapter"), "--generate", "--max-examples", "2",
                 "--json", str(tmp_path / "g.json")]) == 0
    test = json.loads((tmp_path / "g.json").read_text())["sets"]["test"]
    assert test["rouge_l"] == pytest.approx(rows[-1]["test_rouge_l"])
    assert test["exact_match"] == pytest.approx(rows[-1]["test_exact_match"])
    with pytest.raises(config.ConfigError, match="generate_every"):
        config.load(None, {"model.name": "tiny", "run.generate_every": -1})


def test_the_round_plot_shows_task_metrics_when_a_run_logs_them(tmp_path):
    """plots/loss.png: losses per round, and Rouge-L / exact match on a second axis once [run] generate_every logs
    them (rows without them: losses only)."""
    from fedtune.run.metrics import MetricsWriter

    w = MetricsWriter(tmp_path / "a")
    w.rows = [{"round": 0, "test_loss": 2.0, "test_rouge_l": 0.1, "test_exact_match": 0.0},
              {"round": 1, "train_loss": 1.9, "test_loss": 1.8}, {"round": 2, "test_loss": 1.7, "test_rouge_l": 0.2,
                                                                   "test_exact_match": 0.5}]
    assert w.plot() == tmp_path / "a" / "plots" / "loss.png" and (tmp_path / "a" / "plots" / "loss.png").stat().st_size
    assert w.plotted == ["train_loss", "test_loss", "test_rouge_l", "test_exact_match"]
    w2 = MetricsWriter(tmp_path / "b")
    w2.rows = [{"round": 0, "test_loss": 2.0}, {"round": 1, "test_loss": 1.8}]
    w2.plot()
    assert w2.plotted == ["test_loss"]
