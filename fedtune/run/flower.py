"""The Flower ServerApp, and `fedtune simulate --engine flower` (in-process `flwr.simulation.run_simulation`,
Ray backend, one virtual SuperNode per client). The ServerApp: fedtune's `simulate()` (same model, data,
algorithm, RoundEngine, evaluation, checkpoints, metrics, exports) with the rounds carried by a FlowerTransport
over the Grid.

The ServerApp's [data] is its evaluation data (and Fed-SB's init data); in a deployment each SuperNode
trains on its own (client.py). `flwr run` exits 0 whether the run succeeded or not, so the outcome is
written where the run writes its outputs: run.out/summary.json has "status": "completed" or "failed" with
the reason ("error"), and metrics.jsonl has one row per completed round (with "clients_failed")."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import RunConfig
from fedtune.transports.flower.options import backend_config, flower_options
from fedtune.transports.flower.runconfig import resolve
from fedtune.transports.flower.transport import FlowerTransport, discover

log = logging.getLogger("fedtune")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def failure_summary(cfg: RunConfig, error: BaseException, transport: FlowerTransport | None,
                    node_of: dict[str, int] | None) -> dict[str, Any]:
    """summary.json of a run that failed: why, how far it got (rounds in metrics.jsonl), who failed."""
    metrics = cfg.out_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    return {
        "status": "failed", "error": f"{type(error).__name__}: {error}", "engine": "flower",
        "algorithm": cfg.run.algorithm, "rounds_completed": max([r["round"] for r in rows], default=0),
        "rounds_planned": cfg.run.rounds, "metrics": str(metrics),
        "flower": {"rounds": transport.flower_rounds if transport else [],
                   "node_of": {c: str(n) for c, n in sorted(((transport.node_of if transport else node_of) or {}).items())}},
        "config": cfg.to_dict(),
    }


def run_server(grid: Grid, cfg: RunConfig, *, resume: bool = False, progress: bool = False,
               save_merged: bool = False) -> dict[str, Any]:
    """The whole run over `grid`; summary.json says "completed" or "failed" (and why) either way."""
    from fedtune.run.assemble import simulate

    holder: dict[str, FlowerTransport] = {}
    node_of: dict[str, int] | None = None
    t0 = time.perf_counter()
    try:
        opts = flower_options(cfg)
        node_of = discover(grid, cfg.federation.num_clients, opts["clients"] or None,
                           timeout_s=float(opts["node_timeout_s"]))
        log.info("flower: %d nodes host clients %s", len(node_of), list(node_of))

        def factory(run):
            holder["t"] = FlowerTransport(grid, node_of, straggler_timeout_s=float(opts["straggler_timeout_s"]),
                                          max_message_bytes=int(float(opts["max_message_gb"]) * 1e9))
            return holder["t"]

        summary = simulate(cfg, resume=resume, progress=progress, save_merged=save_merged, transport_factory=factory,
                           roster=list(node_of))
    except Exception as e:
        log.error("flower: the run failed: %s", e)
        _write_json(cfg.out_dir / "summary.json", failure_summary(cfg, e, holder.get("t"), node_of))
        raise
    t = holder["t"]
    summary["status"] = "completed"
    summary["engine"] = "flower"
    summary["flower"] = {
        "message_bytes_down_total": sum(r["down"] for r in t.flower_rounds),
        "message_bytes_up_total": sum(r["up"] for r in t.flower_rounds),
        "resyncs": t.resyncs, "rounds": t.flower_rounds,
        "node_of": {c: str(n) for c, n in t.node_of.items()},  # as of the last round (restarted nodes)
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    _write_json(Path(summary["metrics"]).parent / "summary.json", summary)
    return summary


def make_server_app(cfg: RunConfig | None = None, *, result: dict | None = None, resume: bool = False,
                    progress: bool = False, save_merged: bool = False) -> ServerApp:
    """The fedtune ServerApp. `cfg` None → read from the Flower run config (runconfig.py, which also
    carries `fedtune-resume`). The summary is put in `result["summary"]` when `result` is given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is not None:
            run_cfg, run_resume = cfg, resume
        else:
            run_cfg, run_resume = resolve(context.run_config)
        summary = run_server(grid, run_cfg, resume=run_resume, progress=progress, save_merged=save_merged)
        if result is not None:
            result["summary"] = summary

    return app


def run_flower_simulation(cfg: RunConfig, *, resume: bool = False, progress: bool = False,
                          save_merged: bool = False) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from fedtune.transports.flower.client import make_client_app

    # Ray workers import fedtune from PYTHONPATH: make sure it is this fedtune (worktree/editable safe).
    root = str(Path(__file__).resolve().parents[2])
    if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    if root not in sys.path:
        sys.path.insert(0, root)
    logging.getLogger("flwr").propagate = False  # flwr logs through its own handler; no duplicate lines
    result: dict[str, Any] = {}
    server = make_server_app(cfg, result=result, resume=resume, progress=progress, save_merged=save_merged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server, client_app=make_client_app(cfg, str(cfg.out_dir / "flower-nodes"), share=True),
                       num_supernodes=cfg.federation.num_clients, backend_name=str(flower_options(cfg)["backend"]),
                       backend_config=backend_config(cfg))
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without a result (see the log above)")
    return result["summary"]
