"""Assemble a run (run directory, base model, data, method, engine, transport), drive it, and write its outputs.

`prepare_run` builds everything every entry point shares; `simulate` runs it with the in-process transport (or
the one a factory makes: the Flower engine's); `fedtune server` uses the same pieces (fedtune.run.serve).
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedtune.algorithms.api import FedAlgorithm, GlobalState
from fedtune.algorithms.registry import get_algorithm, with_capability
from fedtune.algorithms.runner import Node
from fedtune.algorithms.wrappers.client_dp import ClientLevelDP
from fedtune.algorithms.wrappers.distributed_dp import DistributedDP
from fedtune.algorithms.wrappers.robust import RobustAggregation
from fedtune.config import ConfigError, RunConfig, ServerSection, clients_per_round
from fedtune.data.prepare import (  # noqa: F401 (ClientData, Prepared, client_ids re-exported)
    ClientData,
    Prepared,
    client_ids,
    context_length,
    format_report,
    load_corpus,
    prepare_data,
)
from fedtune.models import fingerprint
from fedtune.models.hardware import describe_hardware, hardware_metrics, model_device
from fedtune.models.loading import load_for
from fedtune.run import checkpoint, export
from fedtune.run.engine import EngineConfig, EngineHooks, RoundEngine
from fedtune.run.metrics import MetricsWriter
from fedtune.run.rundir import RunDir, RunDirError, identity, resumable
from fedtune.transports.base import Transport
from fedtune.transports.inprocess import InProcessTransport, plan_workers, usable_cpus

log = logging.getLogger("fedtune")


def train_config(cfg: RunConfig) -> dict[str, Any]:
    t = cfg.train
    out = {"steps": t.local_steps, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "lr": cfg.learning_rate(),
           "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm}
    pc = cfg.privacy_config()
    if pc.mode == "sample":  # DP-SGD inside each client; σ calibrated over the planned rounds
        out["privacy"] = dict(pc.to_dict(), rounds=cfg.run.rounds)
    return out


def build_algorithm(cfg: RunConfig, *, deployment: bool = False,
                    ) -> tuple[FedAlgorithm, Callable[[GlobalState], str | None] | None]:
    """The configured algorithm, wrapped with client-level DP when [privacy] mode = "client" (distributed DP when
    "distributed") and with robust
    aggregation when [robust] is set (RobustAggregation(ClientLevelDP(method))), and the engine's budget
    check (stop before a round that would exceed target_epsilon). `deployment` (fedtune server): the
    client-level DP noise comes from the OS unless [privacy] noise_seed is set."""
    algo = get_algorithm(cfg.run.algorithm, cfg.algorithm_config())
    pc, rc = cfg.privacy_config(), cfg.robust_config()
    if pc.mode == "sample" and not algo.capabilities.sample_dp:
        able = ", ".join(with_capability(lambda c: c.sample_dp))
        raise ConfigError(f"[privacy] mode = \"sample\" is not available for {algo.name!r}; use one of {able}")
    dp: ClientLevelDP | None = None
    try:
        if pc.mode == "client":
            if deployment and pc.noise_seed is not None:
                log.warning("[privacy] noise_seed is set: the server's DP noise is reproducible, and anyone who knows "
                            "the seed can subtract it; remove noise_seed in a deployment (noise then comes from the OS)")
            f = cfg.federation
            algo = dp = ClientLevelDP(algo, pc, num_clients=f.num_clients, rounds=cfg.run.rounds,
                                      clients_per_round=clients_per_round(f.num_clients, f.fraction, f.min_clients),
                                      os_noise=deployment and pc.noise_seed is None)
        elif pc.mode == "distributed":
            f, sa = cfg.federation, cfg.secagg_config()
            if not sa.enabled:
                raise ValueError("[privacy] mode = \"distributed\" needs secure aggregation: the clients add the noise "
                                 "inside the masked sum. Set [secagg] enabled = true (or --secagg), or use mode = \"client\"")
            algo = dp = DistributedDP(algo, pc, num_clients=f.num_clients, rounds=cfg.run.rounds,
                                      clients_per_round=clients_per_round(f.num_clients, f.fraction, f.min_clients),
                                      min_survivors=max(sa.min_survivors, f.min_clients), bits=sa.bits,
                                      train=train_config(cfg), clip=sa.clip)
        if rc.enabled:
            algo = RobustAggregation(algo, rc)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if dp is None:
        return algo, None

    def budget_check(state: GlobalState) -> str | None:
        if dp.would_exceed_budget(state):
            return (f"the next round would exceed target_epsilon={pc.target_epsilon} "
                    f"(ε spent {dp.epsilon(state):.4f} at δ={dp.delta:g})")
        return None

    return algo, budget_check


def engine_config(cfg: RunConfig, run_id: str = "") -> EngineConfig:
    f, sa = cfg.federation, cfg.secagg_config()
    return EngineConfig(rounds=cfg.run.rounds, seed=cfg.run.seed, fraction=f.fraction, min_clients=f.min_clients,
                        round_timeout_s=f.round_timeout_s, max_round_retries=f.max_round_retries,
                        train=train_config(cfg),
                        max_examples_per_client=cfg.section("server", ServerSection).max_examples_per_client,
                        secagg=sa if sa.enabled else None, run_id=run_id, max_norm_ratio=f.max_norm_ratio,
                        max_client_weight=f.max_client_weight)


def format_row(row: dict[str, Any]) -> str:
    def num(v, fmt):
        return format(v, fmt) if isinstance(v, int | float) else "-"

    return (f"round {row['round']:>3} | clients {row.get('clients_completed', 0)}/{row.get('clients_sampled', 0)}"
            f" | train {num(row.get('train_loss'), '.4f')} | eval {num(row.get('eval_loss'), '.4f')}"
            f" | test {num(row.get('test_loss'), '.4f')}"
            f" | up {num(row.get('bytes_up'), ',')} B | down {num(row.get('bytes_down'), ',')} B"
            f" | {num(row.get('wall_s'), '.1f')} s"
            + (f" | ε {row['epsilon']:.3f}" if isinstance(row.get("epsilon"), float) and row["epsilon"] == row["epsilon"] else ""))


@dataclass
class Run:
    """Everything a run needs, built once by `prepare_run` and shared by every transport."""

    cfg: RunConfig
    tokenizer: Any
    base_fingerprint: str
    data: dict[str, ClientData]
    global_eval: list[dict]
    algo: FedAlgorithm
    engine: RoundEngine | None  # None only while its transport is made (prepare_run's `transport(run)`)
    gm: Node  # the global model: evaluated between rounds, and in simulation the base every client trains on
    writer: MetricsWriter
    state: GlobalState
    start_round: int
    t_start: float
    rundir: RunDir
    test: list[dict] = field(default_factory=list)  # tokenized global test set (drawn before partitioning)
    test_examples: list = field(default_factory=list)  # the same, raw Example objects
    data_report: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Release the run directory (its lock); call when the run ends, however it ends."""
        self.writer.close()
        self.rundir.release()


TransportFactory = Callable[[Run], Transport]


def prepare_run(cfg: RunConfig, *, transport: TransportFactory, resume: bool = False,
                roster: list[str] | None = None, deployment: bool = False, evaluate: bool = True) -> Run:
    """Lock the run directory (fedtune.run.rundir), load the base model and data, build the algorithm, the global
    model (resumed from this run's newest checkpoint when asked) used for evaluation (and, in simulation, shared by
    the clients), then `transport(run)` (the run, its engine not built yet) and the engine that drives it.
    `deployment`: a real server (see build_algorithm); `evaluate`: evaluate the global model between rounds. The
    caller must `run.close()`."""
    rd = RunDir(cfg.out_dir).lock()
    try:
        rd.clean_temp()
        if not resume:
            rd.check_fresh()  # before the slow part
        return _prepare_run(cfg, rd, transport, resume=resume, roster=roster, deployment=deployment,
                            evaluate=evaluate)
    except BaseException:
        rd.release(failed=True)
        raise


def check_resumed_state(algo: FedAlgorithm, fresh: GlobalState, resumed: GlobalState, engine_state: dict[str, Any],
                        where: Path) -> None:
    """Refuse (RunDirError: exit 2) a checkpoint this fedtune would misread: stamped with another state format
    than `algo.state_format` (or unstamped, for a method whose format changed since checkpoints carry one), or
    missing a tensor / meta key that the fresh state has, or holding such a tensor with another shape or dtype
    (a damaged or foreign checkpoint). Said before anything is trained, never as a traceback mid-round."""
    fmt, want = engine_state.get("state_format"), algo.state_format
    if fmt != want and not (fmt is None and want == 1):
        held = f"format {fmt}" if fmt is not None else "a format from before fedtune stamped checkpoints"
        raise RunDirError(f"cannot resume {where}: its {algo.name} state has {held}, this fedtune reads format "
                          f"{want} (see state_format in fedtune/algorithms); start a new run (another --out, or "
                          "--overwrite) or resume it with the fedtune that wrote it")
    for k, t in sorted(fresh.tensors.items()):
        r = resumed.tensors.get(k)
        if r is None or tuple(r.shape) != tuple(t.shape) or r.dtype != t.dtype:
            got = "no such tensor" if r is None else f"{tuple(r.shape)} {r.dtype}"
            raise RunDirError(f"cannot resume {where}: its checkpoint's {algo.name} state does not fit this run: "
                              f"{k!r} should be {tuple(t.shape)} {t.dtype}, found {got} (damaged, or written by "
                              "another fedtune); start a new run (another --out, or --overwrite)")
    if missing := sorted(set(fresh.meta) - set(resumed.meta)):
        raise RunDirError(f"cannot resume {where}: its checkpoint's {algo.name} state lacks {missing} (damaged, or "
                          "written by another fedtune); start a new run (another --out, or --overwrite)")


def _prepare_run(cfg: RunConfig, rd: RunDir, transport: TransportFactory, *, resume: bool, roster: list[str] | None,
                 deployment: bool, evaluate: bool) -> Run:
    t_start = time.perf_counter()
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    corpus = load_corpus(cfg)  # bad data fails here, before the model is loaded and before anything is written
    base = load_for(cfg, train=not deployment)  # one shared frozen base for every simulated client
    model, tok, base_fp = base.model, base.tokenizer, base.fingerprint
    log.info("model %s: %s", cfg.model.name, describe_hardware(model, base.holding))
    prep = prepare_data(cfg, tok, roster, context_len=context_length(model), corpus=corpus)
    data, global_eval = prep.clients, prep.global_eval
    log.info("%s", format_report(prep.report))
    algo, budget_check = build_algorithm(cfg, deployment=deployment)
    if algo.capabilities.data_init:  # methods whose init reads data (Fed-SB) use the first client's
        if cfg.privacy_config().enabled:  # that read would not be covered by the reported ε
            log.warning("privacy is on: %s starts from a data-independent (seeded random) init instead of "
                        "reading a client's data", algo.name)
        else:
            algo.set_init_data(next(iter(data.values())).train, tok.pad_token_id)
    state = algo.initialize(model, seed=cfg.run.seed)
    rec = rd.begin(identity(cfg, list(data)), base_fp, resume=resume, may_change=resumable(cfg))
    start, resumed = 1, {}
    try:
        ck = checkpoint.latest(rd.ckpt_dir, run_id=rec["run_id"]) if resume else None
    except checkpoint.CheckpointFormatError as e:
        raise RunDirError(str(e)) from None
    if ck is not None:
        check_resumed_state(algo, state, ck.state, ck.engine, cfg.out_dir)
        state, start, resumed = ck.state, ck.round + 1, ck.engine
        log.info("resuming from the checkpoint of round %d (run %s)", start - 1, rec["run_id"][:8])
    if resume:
        rd.drop_after(start - 1)
    gm = Node.for_server(model, algo, state, base.holding)
    gm.client.load_state_dict(resumed.get("client_state", {}))  # e.g. the simulated clients' DP accountants
    writer = MetricsWriter(cfg.out_dir, resume_round=start - 1 if start > 1 else None)
    run = Run(cfg, tok, base_fp, data, global_eval, algo, None, gm, writer, state, start, t_start, rd,
              test=prep.test, test_examples=prep.test_examples, data_report=prep.report)
    run_ids = {"run_id": rec["run_id"], "config_hash": rec["config_hash"]}
    bs, pad = cfg.run.eval_batch_size, tok.pad_token_id

    def on(features: list[dict]) -> Callable[[GlobalState], float] | None:
        return gm.loss_of(algo, features, pad_id=pad, batch_size=bs) if features and evaluate else None

    if not global_eval:
        log.warning("no eval examples ([data] eval_fraction = %s): eval is skipped, eval loss is reported as -",
                    cfg.data.eval_fraction)
    if not prep.test:
        log.warning("no global test examples ([data] test_fraction = %s): test is skipped, test loss is reported as -",
                    cfg.data.test_fraction)
    gen_every = cfg.run.generate_every if prep.test and evaluate else 0
    hooks = EngineHooks(evaluate=on(global_eval), test=on(prep.test), budget_check=budget_check,
                        extra_state=lambda: {"client_state": gm.client.state_dict(), **run_ids},
                        generate=gm.generation_of(algo, prep.test, tok, max_examples=cfg.run.generate_max_examples)
                        if gen_every else None, generate_every=gen_every)
    run.engine = RoundEngine(algo=algo, transport=transport(run), roster=list(data),
                             cfg=engine_config(cfg, rec["run_id"]),
                             out_dir=cfg.out_dir, hooks=hooks, resumed=resumed)
    return run


def execute(run: Run, *, progress: bool = True) -> GlobalState:
    """Drive the engine from run.start_round to the end, with a rounds bar and one line per round."""
    bar = tqdm(total=run.cfg.run.rounds, initial=run.start_round - 1, desc="rounds", disable=not progress, position=0)

    def on_round(row: dict[str, Any]) -> None:
        bar.update(1)
        tqdm.write(format_row(row))
        sys.stdout.flush()  # one line per round, visible at once even when stdout is a file

    try:
        run.state = run.engine.run(run.state, start_round=run.start_round, writer=run.writer, on_round=on_round)
    finally:
        bar.close()
    return run.state


def _finite_column(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), int | float) and r[key] == r[key]]


def _client_counts(run: Run) -> dict[str, dict[str, Any]]:
    """Each client's examples: over gRPC what it declared at Join (its own data: the coordinator's [data] split
    is not what it trained on), else the split this process made."""
    hw = run.engine.client_hardware or {}
    out = {}
    for cid, d in run.data.items():
        declared = (hw.get(cid) or {}).get("declared_examples")
        out[cid] = ({"train_examples": declared, "source": "declared by the client at Join"} if declared is not None
                    else {"train_examples": len(d.train), "eval_examples": len(d.eval), "categories": d.categories})
    return out


def finalize_run(run: Run, *, save_merged: bool = False) -> dict[str, Any]:
    """Export the adapter (and merged model), write CSV, plot and summary.json; return the summary."""
    cfg, gm, writer, state, out = run.cfg, run.gm, run.writer, run.state, run.cfg.out_dir
    gm.catch_up(run.algo, state)
    pad = run.tokenizer.pad_token_id  # the global model on each client's own held-out slice (personalisation gap)
    client_eval = {cid: gm.evaluate(d.eval, pad_id=pad, batch_size=cfg.run.eval_batch_size) if d.eval else None
                   for cid, d in run.data.items()}
    adapter_dir = export.export_adapter(gm, out / "adapter", base_name=cfg.model.name, seed=cfg.run.seed,
                                        base_fingerprint=run.base_fingerprint)
    # full-parameter methods (FedKSeed "full") have no adapter: their result is the merged model
    merged_dir = export.export_merged(gm, run.tokenizer, out / "merged") if save_merged or not adapter_dir else None
    writer.write_csv()
    plot = writer.plot()
    evals, tests = (_finite_column(writer.rows, k) for k in ("eval_loss", "test_loss"))
    summary = {
        "algorithm": run.algo.name, "rounds_completed": state.version, "stopped_early": run.engine.stop_reason,
        "epsilon": run.engine.epsilon_max,
        "delta": next((r["delta"] for r in reversed(writer.rows) if r.get("delta")), None),
        "privacy": cfg.privacy_config().to_dict(),
        "eval_loss_first": evals[0] if evals else None, "eval_loss_final": evals[-1] if evals else None,
        "eval_skipped": None if run.global_eval else "no eval examples ([data] eval_fraction = 0 or too little data)",
        "test_loss_first": tests[0] if tests else None, "test_loss_final": tests[-1] if tests else None,
        "test_examples": len(run.test), "client_eval_loss_final": client_eval,
        "test_skipped": None if run.test else "no global test examples ([data] test_fraction = 0 or too little data)",
        "bytes_up_total": sum(r.get("bytes_up") or 0 for r in writer.rows),
        "bytes_down_total": sum(r.get("bytes_down") or 0 for r in writer.rows),
        "run_id": run.rundir.record.get("run_id"), "config_hash": run.rundir.record.get("config_hash"),
        "base_model_fingerprint": run.base_fingerprint, "global_model_fingerprint": fingerprint(gm.model),
        "clients": _client_counts(run),
        "hardware": hardware_metrics(gm.model, gm.holding), "client_hardware": run.engine.client_hardware,
        "data": run.data_report,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "adapter_export": gm.client.export_info if adapter_dir else None,
        "merged": str(merged_dir) if merged_dir else None,
        "plot": str(plot) if plot else None, "metrics": str(writer.path),
        "wall_s": round(time.perf_counter() - run.t_start, 2), "config": cfg.to_dict(),
    }
    writer.summary(summary)
    return summary


def simulation_devices(setting: list[str] | str, gpus: int) -> list[str]:
    """[federation] devices as a device list ("all": every one of `gpus` CUDA devices); ConfigError for a GPU
    this machine does not have."""
    devices = [f"cuda:{i}" for i in range(gpus)] if setting == "all" else list(setting)
    if setting == "all" and not devices:
        raise ConfigError('federation.devices = "all" needs a CUDA GPU; this machine has none (use [] or "cpu"s)')
    for d in devices:
        i = 0 if d == "cuda" else int(d[5:]) if d.startswith("cuda:") else None
        if i is not None and i >= gpus:
            raise ConfigError(f"federation.devices names {d}, but this machine has {gpus} CUDA GPU(s)")
    return devices


def device_replicas(cfg: RunConfig, gm: Node) -> list[Node]:
    """One Node per [federation] devices entry (two or more): the global model where it is on that device (the
    first time), else a base loaded onto the device, set up and synced by the transport at its first round."""
    devices = simulation_devices(cfg.federation.devices, torch.cuda.device_count())
    if len(devices) < 2:
        return []
    out, home = [], model_device(gm.model)
    for d in devices:
        if torch.device(d) == home and gm not in out:
            out.append(gm)
            continue
        one = copy.deepcopy(cfg)
        one.model.device = d
        base = load_for(one, train=True)
        out.append(Node(base.model, base.holding))
    log.info("simulation devices: %s (%d base replica(s) loaded besides the global model's)", ", ".join(devices),
             sum(r is not gm for r in out))
    return out


def in_process(run: Run, *, progress: bool = True) -> InProcessTransport:
    """The in-process transport of a simulation: every client on the run's one shared model."""
    cfg = run.cfg
    replicas = device_replicas(cfg, run.gm)
    requested = len(replicas) if replicas else cfg.federation.workers
    workers, per_worker = plan_workers(requested, torch.get_num_threads(), usable_cpus())
    transport = InProcessTransport(run.gm, run.data, run.tokenizer.pad_token_id, progress,
                                   batch_clients=cfg.federation.batch_clients and run.algo.capabilities.batched,
                                   workers=workers, threads_per_worker=per_worker, replicas=replicas)
    log.info("simulation: %s", transport.describe())
    return transport


def simulate(cfg: RunConfig, *, resume: bool = False, progress: bool = True, save_merged: bool = False,
             transport_factory: TransportFactory | None = None, roster: list[str] | None = None) -> dict[str, Any]:
    """Run a whole simulated federation; returns the summary (also written to summary.json).

    `transport_factory(run)` replaces the in-process transport (the Flower engine passes one that sends each round
    over a Flower Grid); everything else is shared. `roster`: the client ids in partition order (default
    client-0 … client-N-1)."""
    factory = transport_factory or (lambda run: in_process(run, progress=progress))
    run = prepare_run(cfg, transport=factory, resume=resume, roster=roster)
    try:
        execute(run, progress=progress)
        return finalize_run(run, save_merged=save_merged)
    finally:
        run.close()


def output_paths(summary: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, summary[k]) for k in ("adapter", "merged", "metrics", "plot") if summary.get(k)] + [
        ("summary", str(Path(summary["metrics"]).parent / "summary.json"))]
