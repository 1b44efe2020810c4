"""Baselines in the federated harness, same data and step budget (`fedtune simulate --baseline local|central`).

local    each client trains alone: a one-client FedAvg-LoRA run on its own data for rounds × local_steps
         (with one client, aggregation is the identity, so this is plain local LoRA training, optimiser reset each
         round as in the federation). Reported per client on its own held-out slice and on the global test set;
         the run's rows are the means over clients (the local models' global test loss is computed at round 0 and at
         the end only: that is 4 test evaluations per round otherwise).
central  all clients' training data pooled into one client that runs rounds × local_steps steps at batch
         batch_size × (clients per round): the same examples seen *and* the same number of optimiser steps as each
         client of the federation (the federation's compute, done on one machine with the data in one place).
central-seq
         the pooled data, rounds × (clients per round · local_steps) steps at batch batch_size: the same examples
         seen in K× more sequential steps (a stronger reference than the federation's step budget allows).

All three reuse the round engine and the in-process transport (rows, checkpoints, summary.json, adapters); no bytes
cross a network, so bytes are 0. Each model lands in <out>/models/<client-id | central | central-seq>/ (a normal run dir:
`fedtune eval --adapter <out>/models/client-0/adapter` works).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from fedtune.algorithms.registry import with_capability
from fedtune.algorithms.runner import Node
from fedtune.config import RunConfig, clients_per_round
from fedtune.data.prepare import ClientData
from fedtune.run.assemble import Run, engine_config, execute, finalize_run, prepare_run
from fedtune.run.engine import EngineHooks, RoundEngine
from fedtune.run.metrics import MetricsWriter
from fedtune.transports.inprocess import InProcessTransport

KINDS = ("local", "central", "central-seq")


def baseline_method() -> str:
    """The method the baselines train with: the one whose one-client run is plain LoRA training
    (Capabilities.baseline; its [lora] / own settings and lr apply)."""
    names = with_capability(lambda c: c.baseline)
    if len(names) != 1:
        raise RuntimeError(f"exactly one method must declare Capabilities.baseline, got {names}")
    return names[0]


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def _train_alone(run: Run, name: str, data: ClientData, steps: int, progress: bool, *, batch_size: int,
                 test_every_round: bool = True, cache: dict[str, float] | None = None) -> dict[str, Any]:
    """One single-client run on the shared model, from the run's initial global state; returns its summary.
    Without test_every_round the (costly) global test loss is computed at round 0 (once, cached) and at the end."""
    cfg = copy.deepcopy(run.cfg)
    cfg.run.out = str(run.cfg.out_dir / "models" / name)
    cfg.train.local_steps = steps
    cfg.train.batch_size = batch_size
    cfg.federation.num_clients, cfg.federation.min_clients, cfg.federation.fraction = 1, 1, 1.0
    algo, pad, bs = run.algo, run.tokenizer.pad_token_id, cfg.run.eval_batch_size
    gm = Node.for_server(run.gm.model, algo, run.state, run.gm.holding)

    def on(features):
        return gm.loss_of(algo, features, pad_id=pad, batch_size=bs)

    test = on(run.test)

    def test_fn(s):
        if s.version == 0 and cache is not None:
            if "base" not in cache:
                cache["base"] = test(s)
            return cache["base"]
        return test(s) if test_every_round or s.version in (0, cfg.run.rounds) else math.nan

    hooks = EngineHooks(evaluate=on(data.eval) if data.eval else None, test=test_fn if run.test else None,
                        nan_is_skipped=not test_every_round)
    engine = RoundEngine(algo=algo, transport=InProcessTransport(gm, {name: data}, pad, progress=False),
                         roster=[name], cfg=dataclasses.replace(engine_config(cfg), secagg=None), out_dir=cfg.out_dir,
                         hooks=hooks)  # one client alone: nothing to hide it in
    sub = dataclasses.replace(run, cfg=cfg, data={name: data}, global_eval=data.eval, engine=engine, gm=gm,
                              writer=MetricsWriter(cfg.out_dir), state=run.state, start_round=1,
                              t_start=time.perf_counter())
    execute(sub, progress=progress)
    gm.catch_up(algo, sub.state)
    summary = finalize_run(sub)
    summary["client_eval_loss_final"] = {cid: gm.evaluate(d.eval, pad_id=pad, batch_size=bs) if d.eval else None
                                         for cid, d in run.data.items()}  # this model on every client's slice
    return summary


class _NoRounds:
    """The transport of a baseline's outer run, which trains no rounds itself (each model is a run of its own)."""

    def run_round(self, plan, timeout_s):
        raise RuntimeError("a baseline's outer run trains no rounds")


def simulate_baseline(cfg: RunConfig, kind: str, *, progress: bool = True) -> dict[str, Any]:
    """Run the `kind` baseline; writes <out>/metrics.jsonl (means over the models) and summary.json."""
    if kind not in KINDS:
        raise ValueError(f"baseline must be one of {KINDS}, got {kind!r}")
    cfg = copy.deepcopy(cfg)
    cfg.run.algorithm = baseline_method()
    run = prepare_run(cfg, transport=lambda _: _NoRounds())
    try:
        return _baseline(run, cfg, kind, progress)
    finally:
        run.close()  # releases the run directory however the baseline ends


def _baseline(run: Run, cfg: RunConfig, kind: str, progress: bool) -> dict[str, Any]:
    per_round_clients = clients_per_round(len(run.data), cfg.federation.fraction, cfg.federation.min_clients)
    bs, tau = cfg.train.batch_size, cfg.train.local_steps
    if kind == "local":
        subs = {cid: (d, tau, bs) for cid, d in run.data.items()}
    else:  # note: the pooled set's eval is the union of the clients' slices (the federation's eval set)
        pooled = ClientData(train=[f for d in run.data.values() for f in d.train], eval=run.global_eval,
                            categories=sorted({c for d in run.data.values() for c in d.categories}))
        subs = {kind: (pooled, tau, bs * per_round_clients) if kind == "central"
                else (pooled, tau * per_round_clients, bs)}
    cache: dict[str, float] = {}  # every model starts from the same base: its test loss is computed once
    models = {name: _train_alone(run, name, d, steps, progress, batch_size=b, test_every_round=kind != "local",
                                 cache=cache)
              for name, (d, steps, b) in subs.items()}
    per_round = [[json.loads(line) for line in Path(s["metrics"]).read_text().splitlines() if line.strip()]
                 for s in models.values()]
    for rows in zip(*per_round, strict=True):
        run.writer.append({
            "round": rows[0]["round"], "algorithm": kind,
            **{k: _mean([r.get(k) for r in rows]) for k in ("train_loss", "eval_loss", "test_loss")},
            "bytes_up": 0, "bytes_down": 0, "wall_s": sum(r.get("wall_s") or 0 for r in rows),
        })
    if kind == "local":  # each client's own model on its own slice
        client_eval = {cid: models[cid]["client_eval_loss_final"][cid] for cid in run.data}
        client_test = {cid: models[cid]["test_loss_final"] for cid in run.data}
    else:
        client_eval = models[kind]["client_eval_loss_final"]
        client_test = {cid: models[kind]["test_loss_final"] for cid in run.data}
    tests = [r["test_loss"] for r in run.writer.rows if r.get("test_loss") is not None]
    evals = [r["eval_loss"] for r in run.writer.rows if r.get("eval_loss") is not None]
    run.writer.write_csv()
    plot = run.writer.plot()
    summary = {
        "algorithm": kind, "baseline": kind, "method": cfg.run.algorithm, "rounds_completed": cfg.run.rounds,
        "test_loss_first": tests[0] if tests else None, "test_loss_final": tests[-1] if tests else None,
        "eval_loss_first": evals[0] if evals else None, "eval_loss_final": evals[-1] if evals else None,
        "test_examples": len(run.test), "client_eval_loss_final": client_eval, "client_test_loss_final": client_test,
        "client_eval_loss_mean": _mean(list(client_eval.values())),
        "steps_per_round": {name: steps for name, (_, steps, _) in subs.items()},
        "batch_size": {name: b for name, (_, _, b) in subs.items()},
        "bytes_up_total": 0, "bytes_down_total": 0, "epsilon": None,
        "clients": {cid: {"train_examples": len(d.train), "eval_examples": len(d.eval), "categories": d.categories}
                    for cid, d in run.data.items()},
        "models": {name: {"adapter": s["adapter"], "summary": str(run.cfg.out_dir / "models" / name / "summary.json")}
                   for name, s in models.items()},
        "adapter": None, "merged": None, "plot": str(plot) if plot else None, "metrics": str(run.writer.path),
        "wall_s": round(time.perf_counter() - run.t_start, 2), "config": cfg.to_dict(),
    }
    run.writer.summary(summary)
    return summary
