"""Turn the finished report runs into results/matrix.json, results/REPORT.md and PNG plots (see report.py)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

FEDERATED = ("fedavg", "flora", "fedsb", "fedkseed")
LABEL = {"fedavg": "FedAvg-LoRA", "flora": "FLoRA", "fedsb": "Fed-SB", "fedkseed": "FedKSeed (lora)",
         "local": "local-only", "central": "centralized (same steps)", "central-seq": "centralized (sequential)"}
BASELINES = ("local", "central", "central-seq")


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not math.isnan(v)


def _mean(vs: list[Any]) -> float | None:
    vs = [v for v in vs if _finite(v)]
    return sum(vs) / len(vs) if vs else None


def peak_rss_mb(run: Path) -> float | None:
    """The entry process's peak RSS, written by report.py beside the run (None when it ran in a shared process)."""
    f = run / "peak_rss_mb.txt"
    return float(f.read_text()) if f.is_file() else None


def run_lr(summary: dict[str, Any], method: str | None) -> float | None:
    """The lr the run trained at (its saved config's effective lr for `method`)."""
    from fedtune.run.evaluation import config_from_summary

    cfg = config_from_summary(summary)
    if method:
        cfg.run.algorithm = method
    return cfg.learning_rate()


def collect(entries: dict[str, dict[str, Any]], runs: Path) -> list[dict[str, Any]]:
    out = []
    for name, spec in entries.items():
        run = runs / name.replace("@", "-lr")
        if not (run / "summary.json").is_file():
            continue
        s = json.loads((run / "summary.json").read_text())
        rows = _rows(run)
        trained = [r for r in rows if r["round"] >= 1]
        per_client_up = [r["bytes_up"] / r["clients_completed"] for r in trained if r.get("clients_completed")]
        per_client_down = [r["bytes_down"] / r["clients_completed"] for r in trained if r.get("clients_completed")]
        cum, acc = [], 0
        for r in rows:
            acc += (r.get("bytes_up") or 0) + (r.get("bytes_down") or 0)
            cum.append(acc)
        out.append({
            "name": name, "kind": spec["kind"], "method": spec.get("method"), "lr": run_lr(s, spec.get("method")),
            "target_epsilon": spec.get("epsilon"), "epsilon_spent": s.get("epsilon"),
            "label": LABEL.get(spec["kind"], spec["kind"]) + (f" DP ε={spec['epsilon']:g}" if spec.get("epsilon") else ""),
            "rounds": s.get("rounds_completed"), "test_examples": s.get("test_examples"),
            "test_loss_base": s.get("test_loss_first"), "test_loss_final": s.get("test_loss_final"),
            "eval_loss_base": s.get("eval_loss_first"), "eval_loss_final": s.get("eval_loss_final"),
            "client_eval_loss_final": s.get("client_eval_loss_final") or {},
            "bytes_up_per_client_round": _mean(per_client_up), "bytes_down_per_client_round": _mean(per_client_down),
            "bytes_total": acc, "wall_s_per_round": _mean([r.get("wall_s") for r in trained]),
            "wall_s_total": s.get("wall_s"), "peak_rss_mb": peak_rss_mb(run),
            "test_loss_by_round": [r.get("test_loss") for r in rows], "cum_bytes_by_round": cum,
            "run_dir": str(run), "steps_per_round": s.get("steps_per_round"), "batch_size": s.get("batch_size"),
        })
    return out


def pick_defaults(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: the sweep value with the lowest final eval loss (validation), and all values tried."""
    out = {}
    for m in FEDERATED:
        sweep = [r for r in rows if r["kind"] == m and r["lr"] is not None and not r["target_epsilon"]
                 and _finite(r["eval_loss_final"])]
        if sweep:
            best = min(sweep, key=lambda r: r["eval_loss_final"])
            out[m] = {"lr": best["lr"], "name": best["name"],
                      "tried": {f"{r['lr']:g}": {"eval": r["eval_loss_final"], "test": r["test_loss_final"]}
                                for r in sorted(sweep, key=lambda r: r["lr"])}}
    return out


def _fmt(v: Any, f: str = ".4f") -> str:
    return format(v, f) if _finite(v) else "–"


def _kb(v: Any) -> str:
    return f"{v / 1024:,.1f}" if _finite(v) else "–"


def best_baseline(rows: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    """The run of a baseline kind with the lowest final eval loss (validation) over the lrs it ran at."""
    runs = [r for r in rows if r["kind"] == kind and _finite(r["eval_loss_final"])]
    return min(runs, key=lambda r: r["eval_loss_final"]) if runs else None


def same_lr_peer(rows: list[dict[str, Any]], chosen: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The federated run to set against the baselines (plain LoRA): the best LoRA method (FedAvg, FLoRA) at the
    baselines' lr (same hyperparameters),
    else the best at its tuned default."""
    ref = next((r for r in rows if r["kind"] in BASELINES), None)
    same = [r for r in rows if r["kind"] in ("fedavg", "flora") and not r["target_epsilon"] and ref and r["lr"] == ref["lr"]
            and _finite(r["test_loss_final"])]
    pool = same or [r for r in chosen if _finite(r["test_loss_final"])]
    return min(pool, key=lambda r: r["test_loss_final"]) if pool else None


def plots(rows: list[dict[str, Any]], chosen: list[dict[str, Any]], results: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, ax, name: str, legend_size: int, **grid) -> str:
        """Grid, legend, layout; write results/<name> and close the figure."""
        ax.grid(alpha=0.3, **grid)
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(results / name, dpi=110)
        plt.close(fig)
        return name

    out = {}
    dp = [r for r in rows if r["target_epsilon"]]
    base = [r for r in [next((x for x in rows if x["kind"] == "local"), None)]
            + [best_baseline(rows, k) for k in ("central", "central-seq")] if r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in chosen + dp + base:
        pts = [(i, v) for i, v in enumerate(r["test_loss_by_round"]) if _finite(v)]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, ls="--" if r in dp else (":" if r in base else "-"),
                    label=r["label"])
    ax.set(xlabel="round", ylabel="global test loss", title="Global test loss per round")
    out["round"] = save(fig, ax, "test_loss_vs_round.png", 7)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in chosen + dp:
        pts = [(b, v) for b, v in zip(r["cum_bytes_by_round"], r["test_loss_by_round"], strict=True)
               if _finite(v) and b > 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, ls="--" if r in dp else "-", label=r["label"])
    ax.set_xscale("log")
    ax.set(xlabel="cumulative bytes (up + down, all clients)", ylabel="global test loss",
           title="Global test loss vs communication")
    out["bytes"] = save(fig, ax, "test_loss_vs_bytes.png", 7, which="both")

    local = next((r for r in rows if r["kind"] == "local"), None)
    best = same_lr_peer(rows, chosen)
    if local and best:
        cids = sorted(local["client_eval_loss_final"])
        fig, ax = plt.subplots(figsize=(7, 4))
        w = 0.38
        xs = range(len(cids))
        ax.bar([x - w / 2 for x in xs], [best["client_eval_loss_final"].get(c) or 0 for c in cids], w,
               label=f"global model ({best['label']}, lr {best['lr']:g})")
        ax.bar([x + w / 2 for x in xs], [local["client_eval_loss_final"].get(c) or 0 for c in cids], w,
               label=f"local-only model (lr {local['lr']:g})")
        ax.set_xticks(list(xs), cids)
        ax.set(ylabel="loss on the client's own held-out slice", title="Personalisation gap: global vs local-only")
        out["clients"] = save(fig, ax, "per_client.png", 8, axis="y")
    return out


def prompt_table(rows: list[dict[str, Any]], chosen: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Greedy answers of the base and of each chosen method's global adapter to the first n test prompts."""
    from fedtune.data.prepare import context_length, prepare_data
    from fedtune.run.evaluation import GenConfig, config_from_summary, generate, load_tuned

    if not chosen or n <= 0:
        return []
    cfg = config_from_summary(json.loads((Path(chosen[0]["run_dir"]) / "summary.json").read_text()))
    base = load_tuned(cfg.model.name, seed=cfg.run.seed)
    test = prepare_data(cfg, base.tokenizer, context_len=context_length(base.model)).test_examples[:n]
    gc = GenConfig(max_new_tokens=32)
    table = [{"prompt": ex.prompt, "reference": ex.response, "answers": {}} for ex in test]
    for t in table:
        t["answers"]["base"] = generate(base.model, base.tokenizer, [{"role": "user", "content": t["prompt"]}], gc)
    central = [r for r in (best_baseline(rows, k) for k in ("central", "central-seq")) if r]
    for r in chosen + central:
        adapter = Path(r["run_dir"]) / (f"models/{r['kind']}/adapter" if r in central else "adapter")
        if not (adapter / "adapter_config.json").is_file():
            continue
        m = load_tuned(cfg.model.name, adapter=str(adapter), seed=cfg.run.seed)
        for t in table:
            t["answers"][r["label"]] = generate(m.model, m.tokenizer, [{"role": "user", "content": t["prompt"]}], gc)
    return table


MC_YAML = """task: fedtune_report_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def mc_task(test, tok, out: Path, n: int, seed: int = 0) -> Path:
    """A local lm-eval multiple-choice task from the global test set: each prompt (rendered with the model's chat
    template, as in training) with its reference response and 3 other test responses as distractors, the
    correct one at a seeded random position. Written to out/ as JSONL + YAML (offline)."""
    import random

    from fedtune.run.evaluation import render_chat

    rng = random.Random(seed)
    pool = sorted({ex.response for ex in test})
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for ex in test[:n]:
        others = [r for r in pool if r != ex.response]
        if len(others) < 3 or not ex.prompt:
            continue
        choices = rng.sample(others, 3)
        answer = rng.randrange(4)
        choices.insert(answer, ex.response)
        docs.append({"text": render_chat(tok, [{"role": "user", "content": ex.prompt}]), "choices": choices,
                     "answer": answer})
    (out / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "fedtune_report_mc.yaml").write_text(MC_YAML.format(data=(out / "mc.jsonl").resolve()))
    return out / "fedtune_report_mc.yaml"


def task_metrics(rows: list[dict[str, Any]], models: list[dict[str, Any]], results: Path, n: int
                 ) -> dict[str, Any]:
    """Rouge-L / exact match of greedy answers on the first n global test examples, and the accuracy on a
    multiple-choice task built from them (lm-eval), for the base and each of `models` (written into their rows).
    Returns the base's {"rouge_l", "exact_match", "mc_acc", "examples"}."""
    from fedtune.data.prepare import context_length, prepare_data
    from fedtune.run.evaluation import config_from_summary, load_tuned
    from fedtune.training.genmetrics import generation_metrics

    if not rows or n <= 0:
        return {}
    cfg = config_from_summary(json.loads((Path(rows[0]["run_dir"]) / "summary.json").read_text()))
    base = load_tuned(cfg.model.name, seed=cfg.run.seed)
    prep = prepare_data(cfg, base.tokenizer, context_len=context_length(base.model))
    try:
        from fedtune.run.lmeval import run_tasks

        yaml = mc_task(prep.test_examples, base.tokenizer, results / "mc_task", n, cfg.run.seed)
    except ImportError:  # pragma: no cover - lm-eval is in the eval extra, installed by setup.sh
        yaml = None

    def score(m) -> dict[str, Any]:
        g = generation_metrics(m.model, m.tokenizer, prep.test, max_examples=n, max_new_tokens=32)
        acc = None
        if yaml is not None:
            acc = run_tasks(m.model, m.tokenizer, [str(yaml)], seed=cfg.run.seed)["fedtune_report_mc"]["acc"]
        return {"rouge_l": g["rouge_l"], "exact_match": g["exact_match"], "mc_acc": acc, "examples": g["generated"]}

    out = score(base)
    for r in models:
        adapter = Path(r["run_dir"]) / (f"models/{r['kind']}/adapter" if r["kind"] in BASELINES else "adapter")
        if (adapter / "adapter_config.json").is_file():
            r |= score(load_tuned(cfg.model.name, adapter=str(adapter), seed=cfg.run.seed))
    return out


def _cell(s: str) -> str:
    return " ".join(s.replace("|", "\\|").split())[:160]


def write_report(entries: dict[str, dict[str, Any]], runs: Path, results: Path, *, prompts: int = 5,
                 notes: str = "", task_examples: int = 0) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    rows = collect(entries, runs)
    defaults = pick_defaults(rows)
    chosen = [next(r for r in rows if r["name"] == d["name"]) for d in defaults.values()]
    dp = [r for r in rows if r["target_epsilon"]]
    local = next((r for r in rows if r["kind"] == "local"), None)
    central, central_seq = (best_baseline(rows, k) for k in ("central", "central-seq"))
    pngs = plots(rows, chosen, results) if rows else {}
    table = prompt_table(rows, chosen, prompts)
    scored = chosen + dp + [x for x in (central, central_seq) if x]
    base_tasks = task_metrics(rows, scored, results, task_examples)
    base_loss = next((r["test_loss_base"] for r in rows if _finite(r["test_loss_base"])), None)
    cfg = json.loads((Path(rows[0]["run_dir"]) / "summary.json").read_text())["config"] if rows else {}
    doc = {"generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "config": cfg,
           "base_test_loss": base_loss, "base_tasks": base_tasks, "defaults": defaults, "runs": rows, "prompts": table}
    (results / "matrix.json").write_text(json.dumps(doc, indent=1))

    L = ["# fedtune: what federated tuning buys (measured)", "",
         f"Generated {doc['generated']} by `simulations/report.py` from the runs in `{runs}`. "
         + (f"Model `{cfg['model']['name']}`, chatterbot-corpus split by category over "
            f"{cfg['federation']['num_clients']} clients, {cfg['run']['rounds']} rounds × "
            f"{cfg['train']['local_steps']} local steps (batch {cfg['train']['batch_size']}, max_seq_len "
            f"{cfg['data']['max_seq_len']}); global test set: {rows[0]['test_examples']} examples drawn before "
            f"partitioning; each client's held-out slice: "
            f"{cfg['data']['max_eval_per_client']} examples." if cfg else ""), "",
         f"Base model global test loss: **{_fmt(base_loss)}**"
         + (f"; Rouge-L **{_fmt(base_tasks.get('rouge_l'))}**, multiple-choice accuracy "
            f"**{_fmt(base_tasks.get('mc_acc'), '.3f')}** (task metrics below)." if base_tasks else "."), ""]
    if notes:
        L += [notes, ""]
    L += ["## Methods at their tuned default", "",
          ("| method | lr | test loss | Δ vs base | bytes up / client-round (KiB) | bytes down / client-round (KiB) "
          "| total bytes (MiB) | wall s / round | peak RSS MB | Rouge-L | exact match | MC acc |"),
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in chosen + dp + [x for x in (local, central, central_seq) if x]:
        d = r["test_loss_final"] - base_loss if _finite(r["test_loss_final"]) and _finite(base_loss) else None
        lr = f"{r['lr']:g}" if r["lr"] else "default"
        L.append(f"| {r['label']} | {lr} | {_fmt(r['test_loss_final'])} | {_fmt(d, '+.4f')} | "
                 f"{_kb(r['bytes_up_per_client_round'])} | {_kb(r['bytes_down_per_client_round'])} | "
                 f"{r['bytes_total'] / 2**20:,.2f} | {_fmt(r['wall_s_per_round'], '.1f')} | "
                 f"{_fmt(r['peak_rss_mb'], '.0f')} | {_fmt(r.get('rouge_l'))} | {_fmt(r.get('exact_match'), '.3f')} | "
                 f"{_fmt(r.get('mc_acc'), '.3f')} |")
    if base_tasks:
        L += ["", (f"Task metrics on the first {base_tasks['examples']} global test examples (base: Rouge-L "
              f"{_fmt(base_tasks['rouge_l'])}, exact match {_fmt(base_tasks['exact_match'], '.3f')}, MC acc "
              f"{_fmt(base_tasks.get('mc_acc'), '.3f')}): Rouge-L and exact match of greedy answers (32 new tokens) "
              "against the reference responses; MC acc: lm-evaluation-harness accuracy on a local multiple-choice "
              "task built from the same examples (the reference among 3 other test responses; chance 0.25). "
              "Local-only models are per client and not scored.")]
    L += ["", "DP rows: sample-level DP-SGD inside each client (opacus), σ calibrated so the planned rounds spend "
          "the target ε (δ = min(1/N_k, 1e-5)); ε spent: "
          + ", ".join(f"{r['label']} {_fmt(r['epsilon_spent'], '.2f')}" for r in dp) + "." if dp else "", ""]
    L += ["## Learning-rate sweep (chose the defaults)", "",
          ("Same workload for every value; the default is the value with the lowest final loss on the clients' "
          "held-out slices (validation). Test loss shown for reference only."), "",
          "| method | lr → final eval loss (test loss) | chosen |", "|---|---|---|"]
    for m, d in defaults.items():
        tried = ", ".join(f"{lr}: {_fmt(v['eval'])} ({_fmt(v['test'])})" for lr, v in d["tried"].items())
        L.append(f"| {LABEL[m]} | {tried} | **{d['lr']:g}** |")
    for ref in (central, central_seq):
        tried = sorted((r for r in rows if ref and r["kind"] == ref["kind"]), key=lambda r: r["lr"])
        if len(tried) > 1:
            L.append(f"| {ref['label']} | " + ", ".join(f"{r['lr']:g}: {_fmt(r['eval_loss_final'])} "
                     f"({_fmt(r['test_loss_final'])})" for r in tried) + f" | **{ref['lr']:g}** |")
    L += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in pngs.items()] + [""]
    L += baseline_lines(rows, central, central_seq)
    L += findings(rows, chosen, dp, local, central, central_seq, base_loss)
    if table:
        L += ["", "## Answers to 5 fixed test prompts (greedy, 32 new tokens)", ""]
        for i, t in enumerate(table, 1):
            L += [f"**{i}. {_cell(t['prompt'])}** — reference: _{_cell(t['reference'])}_", "",
                  "| model | answer |", "|---|---|"]
            L += [f"| {k} | {_cell(v)} |" for k, v in t["answers"].items()] + [""]
    path = results / "REPORT.md"
    path.write_text("\n".join(L) + "\n")
    return path


def baseline_lines(rows, central, central_seq) -> list[str]:
    """How much each baseline trained (steps × batch per round), from its summary."""
    L = []
    for r in (central, central_seq):
        if r and r.get("steps_per_round"):
            steps = next(iter(r["steps_per_round"].values()))
            bs = next(iter((r.get("batch_size") or {None: None}).values()))
            L.append(f"- {r['label']}: the pooled training data, {steps} optimiser steps per round at batch {bs}.")
    head = ("Every baseline sees the same examples as the federation with every client sampled (rounds × clients × "
            "local steps × batch); local-only: each client alone, its τ steps per round.")
    return (["## Baseline budgets", "", head, ""] + L + [""]) if L else []


def findings(rows, chosen, dp, local, central, central_seq, base_loss) -> list[str]:
    L = ["## Findings", ""]
    if not chosen:
        return L + ["No finished federated runs."]
    best = min(chosen, key=lambda r: r["test_loss_final"])
    L.append(f"- **Quality**: best federated method on the global test set: {best['label']} "
             f"({_fmt(best['test_loss_final'])}; base {_fmt(base_loss)}).")
    below = [r["label"] for r in chosen if _finite(base_loss) and r["test_loss_final"] < base_loss]
    above = [r["label"] for r in chosen if r["label"] not in below]
    L.append(f"- Every method's default below the base: {'yes' if not above else 'no'}"
             + (f" (not: {', '.join(above)})" if above else "") + ".")
    cheapest = min(chosen, key=lambda r: r["bytes_total"])
    fastest = min(chosen, key=lambda r: r["wall_s_per_round"] or math.inf)
    L.append(f"- **Bytes**: fewest bytes: {cheapest['label']} ({cheapest['bytes_total'] / 2**20:,.3f} MiB in total); "
             + ", ".join(f"{r['label']} {r['bytes_total'] / 2**20:,.2f} MiB" for r in chosen if r is not cheapest) + ".")
    L.append(f"- **Time**: fastest round: {fastest['label']} ({_fmt(fastest['wall_s_per_round'], '.1f')} s).")
    peer = same_lr_peer(rows, chosen)
    for ref, name in ((central, "centralized (same steps)"), (central_seq, "centralized (sequential)"),
                      (local, "local-only mean")):
        if not ref or not _finite(ref["test_loss_final"]):
            continue
        v = ref["test_loss_final"]
        cen = name.startswith("centralized")
        line = f"- **vs {name}** ({_fmt(v)}, lr {ref['lr']:g}): "
        parts = []
        for r, tag in ((peer, "best federated at the same lr"), (best, "best federated at its tuned default")):
            if r is None:
                continue
            ok = r["test_loss_final"] / v <= 1.05 if cen else r["test_loss_final"] < v
            parts.append(f"{tag}, {r['label']} @ {r['lr']:g}: {_fmt(r['test_loss_final'])} ("
                         + (f"ratio {r['test_loss_final'] / v:.3f}, ≤ 1.05 " if cen else "below: ")
                         + ("met" if ok else "not met") + ")")
        L.append(line + "; ".join(parts) + ".")
        if name == "centralized (sequential)" and best["test_loss_final"] / v > 1.05:
            steps = ref.get("steps_per_round") or {}
            L.append(f"- **Why federated trails sequential centralized training**: with the same examples seen, the "
                     f"sequential run makes {next(iter(steps.values()), 'K·τ')} optimiser steps per round, each "
                     "client of the federation τ, averaged: an average of K short parallel runs moves about as far "
                     "as one of them (it is one step of a K× larger batch), so over these few rounds the federation "
                     "gets ~K× fewer steps of progress. The split by category adds client drift: the clients' "
                     "updates point different ways and partly cancel in the average. With the federation's own step "
                     "budget (centralized, same steps) the gap closes; federated close to sequential centralized "
                     "(FLoRA paper) is a converged-training result.")
    if local:
        g = peer or best
        worse = [c for c, v in local["client_eval_loss_final"].items()
                 if _finite(v) and _finite(g["client_eval_loss_final"].get(c)) and v < g["client_eval_loss_final"][c]]
        gaps = ", ".join(f"{c} {_fmt(g['client_eval_loss_final'].get(c))} vs {_fmt(v)}"
                         for c, v in sorted(local["client_eval_loss_final"].items()))
        L.append(f"- Own held-out slice, global ({g['label']} @ {g['lr']:g}) vs local-only: {gaps}.")
        if worse:
            L.append(f"- **Where federated loses**: on its own held-out slice, the local-only model beats the global "
                     f"model for {', '.join(worse)}. With a split by category each client's slice comes from "
                     "categories no other client holds; the global model spends its updates on everyone's "
                     "categories, a local model only on its own (the personalisation gap in per_client.png).")
        else:
            L.append("- On every client's own held-out slice the global model is at least as good as that "
                     "client's local-only model: no client loses by joining.")
    if dp:
        for r in dp:
            L.append(f"- {r['label']}: test {_fmt(r['test_loss_final'])} (ε spent {_fmt(r['epsilon_spent'], '.2f')}).")
    return L
